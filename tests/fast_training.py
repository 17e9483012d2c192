"""Settings that make a training run take seconds on the tiny synthetic stores of the tests."""

FAST = [
    "train.lr=0.01",
    "train.batch_size=64",
    "train.eval_batch_size=256",
    "train.t_max=64",
    "train.threads=1",
    "train.epochs=1",
]
FAST_SMALL = [*FAST, "model.dim=16"]  # and a smaller embedding
