"""Caffe2 checkpoint conversion (``nonlocal_net.converters``)."""
