"""Writes the Kolors UNet's config and the name and shape of every weight, for the memory bench
(`cargo bench -p relayfarm-models --bench sharded_load_memory` with BENCH_MODEL=unet).

The config is models-spec §4.3 (SDXL topology, text_proj 4096→2048, text_time with 6 × 256 time
ids); the model is built on PyTorch's meta device, so no weights are made or downloaded.

    ../venv/bin/python scripts/kolors_unet_shapes.py
"""

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

OUT = Path(__file__).resolve().parent.parent / "shared/models/benches/data/kolors_unet.json"

CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": 4096,
    "encoder_hid_dim_type": "text_proj",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 5632,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}


def main():
    cfg = {k: v for k, v in CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = UNet2DConditionModel(**cfg)
    tensors = [[name, list(t.shape)] for name, t in model.state_dict().items()]
    params = sum(int(torch.tensor(s).prod()) if s else 1 for _, s in tensors)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"config": CONFIG, "parameters": params, "tensors": tensors}))
    print(f"{OUT}: {len(tensors)} tensors, {params / 1e9:.3f} B parameters")


if __name__ == "__main__":
    main()
