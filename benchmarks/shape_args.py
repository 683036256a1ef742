"""Command-line options several benchmarks share, with the defaults of the
random 2-layer benchmark model (4/2 heads of 32) and its lminf settings."""


def add_lminf_args(p) -> None:
    """G, W, C and the KV block size."""
    p.add_argument("--global-tokens", type=int, default=4)
    p.add_argument("--local-tokens", type=int, default=2048)
    p.add_argument("--distance-cap", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=32)


def add_head_args(p) -> None:
    """The attention shape, for benchmarks that call the kernels without a model."""
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-size", type=int, default=32)
