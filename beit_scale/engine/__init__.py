"""The only package (with checkpoint/) that imports DeepSpeed. Import submodules explicitly:
``engine.ds_config`` and ``engine.dist`` are cheap; ``engine.core`` imports DeepSpeed."""
