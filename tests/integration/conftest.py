"""The tiny pretraining inputs (72 real Fashion-MNIST images, an untrained 8x8-grid dVAE) of tests/distributed."""
from tests.distributed.conftest import inputs  # noqa: F401  (a session fixture, made once for both folders)
