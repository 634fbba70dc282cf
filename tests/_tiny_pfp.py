"""A very small PFP config shared by the training and generation tests (fast on a CPU)."""
import json

from pfp.weights import PFPConfig


def tiny_config(context_mode: str = "cached", inner_dim: int = 32) -> PFPConfig:
    return PFPConfig(
        video_size=(32, 32), fps=8.0, chunk_frames=4, rate="2x2x2", compressor_hidden=(8, 8, 8),
        context_mode=context_mode,
        vae={"kind": "patch", "spatial_factor": 4, "temporal_factor": 1, "scale": 2.0},
        text={"kind": "tiny", "dim": 16, "max_length": 12, "num_layers": 0},
        dit={"kind": "tiny", "inner_dim": inner_dim, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0, "freq_dim": 16},
    )


def write_config(path, config: PFPConfig) -> str:
    with open(path, "w") as f:
        json.dump(config.to_dict(), f)
    return str(path)
