"""Offline teacher stages: frame labels for masked prediction (k-means over spectral features or an encoder's
layer, EnCodec codes), written as sidecars beside the shards."""


class TeacherError(Exception):
    """A teacher stage cannot run as asked; the message names the file or setting and what to do. The stages'
    command lines print it and exit non-zero."""
