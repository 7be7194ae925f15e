"""Vision runtime: safe decoding, pre-processing, main-object localization and embedding on ONNX
Runtime. Shared by the catalog workers and the query side (hence its own top-level package)."""
