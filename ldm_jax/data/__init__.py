"""Data: the synthetic captioned-shapes world (`shapes`) and its TFDS builder (`captioned_shapes`), example
sources for TFDS datasets, image folders and webdataset tars (`readers`), and the input pipeline (`pipeline`)."""
