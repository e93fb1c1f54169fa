//! CoreML MILBlob v2 weight files. (being written)
