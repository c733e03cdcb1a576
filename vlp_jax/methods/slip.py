"""SLIP (Mu et al. 2022): CLIP plus SimCLR self-supervision on the image tower.

    L = L_CLIP(u, v) + w_ssl * NT-Xent(h(pool(x_1)), h(pool(x_2)); tau_ssl)

u, v: the CLIP embeddings of the image `x_1` and its caption; x_1, x_2: two augmented views of
the same image (`batch['image']`, `batch['image2']`; set `data.two_views=True`); pool: the image
tower's pooled output; h: a 3-layer projection MLP (SLIP: 4096-4096-256 with BatchNorm; here
`ssl_mlp_dim`-`ssl_mlp_dim`-`ssl_emb_dim` with LayerNorm, see `ssl_common.ProjectionMLP`), a
Flax head `slip_head` beside the dual encoder's parameters. SLIP encodes a third, lightly
augmented view for the CLIP term; this implementation reuses the first SimCLR view for it (one
image-tower pass less per step). The NT-Xent term is gathered across devices like the CLIP term.

Objectives: `itc` (weight 1) and `ssl` (`objectives.contrastive.SimclrObjective`, weight
`ssl_weight`); metrics `itc/...`, `ssl/ssl_acc`, `loss/itc`, `loss/ssl`.

config.method fields (besides ContrastiveMethod's; FLIP masking applies to the CLIP view):
  ssl_weight: weight of the SimCLR term (SLIP: 1.0).
  ssl_temperature: NT-Xent temperature (SLIP: 0.1).
  ssl_mlp_dim, ssl_emb_dim: projection MLP sizes.
"""
from __future__ import annotations

import dataclasses

from vlp_jax.methods.contrastive import ContrastiveMethod
from vlp_jax.methods.ssl_common import (ProjectionMLP, image_features, pooled_example,
                                        require_accumulation_none, require_key)
from vlp_jax.objectives.contrastive import SimclrObjective
from vlp_jax.objectives.core import Term
from vlp_jax.methods.registry import register_method

HEAD = "slip_head"


@register_method("slip")
@dataclasses.dataclass
class SlipMethod(ContrastiveMethod):

    def setup(self):
        require_accumulation_none(self.config, "SLIP")
        if self.config.get("ssl_weight", 1.0) < 0:
            raise ValueError(f"method.ssl_weight must be >= 0, got {self.config.ssl_weight}")

    def heads(self):
        mlp = ProjectionMLP(self.config.get("ssl_mlp_dim", 256), self.config.get("ssl_emb_dim", 64))
        return ((HEAD, mlp, pooled_example),)

    def terms(self):
        ssl = SimclrObjective(self.mesh, self.apply_head, HEAD,
                              self.config.get("ssl_temperature", 0.1))
        return super().terms() + [Term(ssl, weight=float(self.config.get("ssl_weight", 1.0)))]

    def forward(self, params, aux, batch, rng, masked=True):
        require_key(batch, "image2", "SLIP", "data.two_views=True")
        u, pooled1, _ = image_features(self.model, params, batch["image"],
                                       self.batch_keep_ids(batch, masked))
        _, pooled2, _ = image_features(self.model, params, batch["image2"])
        v = self.model.apply({"params": params}, batch["text"], method="encode_text")
        return dict(image_emb=u, text_emb=v, pooled=[pooled1, pooled2])
