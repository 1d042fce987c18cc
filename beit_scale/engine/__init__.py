"""The only package (with checkpoint/) that imports DeepSpeed. Import submodules explicitly:
``engine.ds_config``, ``engine.dist`` and ``engine.layer_decay`` are cheap; ``engine.core`` imports DeepSpeed."""
