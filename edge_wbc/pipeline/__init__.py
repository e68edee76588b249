"""One field in, a FieldResult out:
read, preprocess, infer, segment, postprocess, classify, quality."""
