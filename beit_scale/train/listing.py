"""`beit-scale models`: the zoo with parameter counts, built on the meta device (no memory, no init cost)."""
from __future__ import annotations

import torch

from beit_scale.models import ZOO, BeitMIM, backbone_param_count


def models_table(vocab_size: int = 8192) -> str:
    rows = [f"{'name':28} {'dim':>5} {'depth':>5} {'heads':>5} {'mlp':>5} {'patch':>5} {'img':>4} "
            f"{'backbone':>10} {'published':>10} {'with MIM head':>14}"]
    for name, s in ZOO.items():
        with torch.device("meta"):
            model = BeitMIM(s, vocab_size)
        backbone = backbone_param_count(model)
        total = sum(p.numel() for p in model.parameters())
        rows.append(f"{name:28} {s.embed_dim:5} {s.depth:5} {s.num_heads:5} {s.mlp_dim:5} {s.patch_size:5} "
                    f"{s.img_size:4} {backbone / 1e6:9.1f}M {s.published_params / 1e6:9.1f}M {total / 1e6:13.1f}M")
    return "\n".join(rows)
