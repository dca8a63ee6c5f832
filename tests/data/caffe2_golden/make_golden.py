# -*- coding: utf-8 -*-
"""Generate the golden Caffe2 pickles with REAL Python 2.7 + numpy 1.x (cPickle).

Run with a Python 2.7 interpreter that has numpy 1.x (the files in this folder were made with
Python 2.7.18 + numpy 1.16.6):

    python2 make_golden.py

It writes, in this folder:

* checkpoint_p2_wrapped.pkl  - like the original's training checkpoints (checkpoints.py): cPickle
  protocol 2, {'blobs': {...}} with unicode keys model_iter / lr / *_momentum, lr a 0-d float32
  array, str keys for parameters and BN statistics.
* affine_p0_flat.pkl         - like modify_caffe2_ftvideo.py's output: cPickle default protocol 0,
  the flat dict, folded _bn_s/_bn_b, lr a Python float under a str key.
* imagenet_p2_flat.pkl       - a flat protocol-2 file with 2-D (4-D) conv weights and a Python
  float lr, like the ImageNet initialisation files.
* golden_arrays.npz          - every array of the three files (numpy's own format).
* manifest.json              - per file: protocol, wrapped, and the items in the order cPickle
  wrote them: key, key type (str/unicode), whether cPickle memoized the key, value kind.

Everything is small (a few KB) and deterministic (fixed seed; Python 2 dict order is its hash
order, which is fixed for str keys).
"""
from __future__ import print_function

import cPickle
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.RandomState(20180615)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def unscope(scoped):
    # as the original's misc.unscope_name: a new string object
    return scoped[scoped.rfind('/') + 1:]


# cPickle memoizes a key only when something besides the dict references it (Py_REFCNT >= 2):
# literal keys ('blobs', 'model_iter', 'lr') are held by the code object; names built at run time
# are held by the dict alone, unless a list keeps them alive during the dump (the conversion
# scripts keep `now_keys = blobs.keys()`). MEMO records that rule per file (a function of the key
# name, so that recording it holds no extra reference to the key objects).
MEMO = {}
KEEP_ALIVE = []


def training_checkpoint():
    """As checkpoints.save_model_params builds it (unicode_literals: u'' literals)."""
    params = [
        ('gpu_0/conv1_w', f32(16, 3, 3, 3, 3)),    # BINSTRING (>= 256 bytes)
        ('gpu_0/res_conv1_bn_s', f32(16)),
        ('gpu_0/res_conv1_bn_b', f32(16)),
        ('gpu_0/pred_w', f32(5, 16)),
        ('gpu_0/pred_b', f32(5)),
    ]
    computed = [
        ('gpu_0/res_conv1_bn_rm', f32(16)),
        ('gpu_0/res_conv1_bn_riv', (np.abs(f32(16)) + 0.5).astype(np.float32)),
    ]
    blobs = {}
    blobs[u'model_iter'] = 400000
    blobs[u'lr'] = np.array(1e-4, dtype=np.float32).reshape(())
    for scoped, value in params:
        name = unscope(scoped + u'_momentum')
        blobs[name] = (value * 0.01).astype(np.float32)
    for scoped, value in params + computed:
        name = unscope(scoped)
        blobs[name] = value
    del name
    MEMO['checkpoint_p2_wrapped.pkl'] = lambda key: key in ('model_iter', 'lr')
    return dict(blobs=blobs)


def affine_file():
    """As modify_caffe2_ftvideo.py writes it: keys of an unpickled dict, kept alive by the
    script's key list, and a literal 'lr'."""
    blobs = {}
    blobs[unscope('gpu_0/conv1_w')] = f32(8, 3, 1, 3, 3)
    # float32 values whose bytes hold 0x27 (') but no 0x22 ("): cPickle's repr switches to
    # double quotes there, as Python 2's repr does.
    blobs[unscope('gpu_0/res_conv1_bn_s')] = np.frombuffer(
        b"'\x00\x80?" * 2 + b"\x00\x00\x00@" * 6, dtype='<f4').copy()
    blobs[unscope('gpu_0/res_conv1_bn_b')] = f32(8)
    KEEP_ALIVE.extend(blobs.keys())
    blobs['lr'] = 0.00125
    MEMO['affine_p0_flat.pkl'] = lambda key: True
    return blobs


def imagenet_file():
    """A flat protocol-2 file of 2-D (4-D) weights with a float lr and a 1000-class-like pred."""
    blobs = {}
    for scoped, value in [
        ('gpu_0/conv1_w', f32(4, 3, 7, 7)),
        ('gpu_0/res_conv1_bn_s', f32(4)),
        ('gpu_0/res_conv1_bn_b', f32(4)),
        ('gpu_0/res_conv1_bn_rm', f32(4)),
        ('gpu_0/res_conv1_bn_riv', (np.abs(f32(4)) + 0.5).astype(np.float32)),
        ('gpu_0/pred_w', f32(10, 4)),
        ('gpu_0/pred_b', f32(10)),
    ]:
        blobs[unscope(scoped)] = value
    blobs['lr'] = 0.1
    MEMO['imagenet_p2_flat.pkl'] = lambda key: key == 'lr'
    return blobs


def items_of(filename, d):
    out = []
    for key, value in d.items():  # the order cPickle iterates (and writes) them
        kind = 'array' if isinstance(value, np.ndarray) else type(value).__name__
        out.append([key, type(key).__name__, MEMO[filename](key), kind])
    return out


def main():
    files = [
        ('checkpoint_p2_wrapped.pkl', training_checkpoint(), 2),
        ('affine_p0_flat.pkl', affine_file(), 0),
        ('imagenet_p2_flat.pkl', imagenet_file(), 2),
    ]
    manifest = {}
    arrays = {}
    for filename, obj, protocol in files:
        with open(os.path.join(HERE, filename), 'wb') as f:
            cPickle.dump(obj, f, protocol)
        wrapped = 'blobs' in obj
        inner = obj['blobs'] if wrapped else obj
        scalars = {}
        for key, value in inner.items():
            if isinstance(value, np.ndarray):
                arrays[filename + '/' + str(key)] = value
            else:
                scalars[str(key)] = value
        manifest[filename] = {
            'protocol': protocol,
            'wrapped': wrapped,
            'items': items_of(filename, inner),
            'scalars': scalars,
        }
    np.savez(os.path.join(HERE, 'golden_arrays.npz'), **arrays)
    with open(os.path.join(HERE, 'manifest.json'), 'w') as f:
        json.dump(manifest, f, indent=1, sort_keys=True, separators=(',', ': '))
        f.write('\n')
    print('numpy', np.__version__)


if __name__ == '__main__':
    main()
