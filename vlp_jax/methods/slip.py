"""SLIP (Mu et al. 2022): CLIP plus SimCLR self-supervision on the image tower.

    L = L_CLIP(u, v) + ssl_weight * NT-Xent(h(pool(x_1)), h(pool(x_2)); tau_ssl)

u, v: the CLIP embeddings of the image `x_1` and its caption; x_1, x_2: two augmented views of
the same image (`batch['image']`, `batch['image2']`; set `data.two_views=True`); pool: the image
tower's pooled output; h: a 3-layer projection MLP (SLIP: 4096-4096-256 with BatchNorm; here
`ssl_mlp_dim`-`ssl_mlp_dim`-`ssl_emb_dim` with LayerNorm, see `ssl_heads.ProjectionMLP`).
SLIP encodes a third, lightly augmented view for the CLIP term; this implementation reuses the
first SimCLR view for it (one image-tower pass less per step). The NT-Xent term is gathered
across devices like the CLIP term (`vlp_jax.losses.simclr`).

config.method fields (besides ContrastiveMethod's; FLIP masking applies to the CLIP view):
  ssl_weight: weight of the SimCLR term (SLIP: 1.0).
  ssl_temperature: NT-Xent temperature (SLIP: 0.1).
  ssl_mlp_dim, ssl_emb_dim: projection MLP sizes.
"""
from __future__ import annotations

import dataclasses

import jax

from vlp_jax.methods.contrastive import ContrastiveMethod
from vlp_jax.methods.ssl_common import (ProjectionMLP, head_input, image_features, init_head,
                                        require_accumulation_none, require_key, ssl_loss_fn)

HEAD = "slip_head"


@dataclasses.dataclass
class SlipMethod(ContrastiveMethod):

    def __post_init__(self):
        super().__post_init__()
        require_accumulation_none(self.config, "SLIP")
        if self.config.get("ssl_weight", 1.0) < 0:
            raise ValueError(f"method.ssl_weight must be >= 0, got {self.config.ssl_weight}")
        self._ssl = ssl_loss_fn(self.mesh, self.config.get("ssl_temperature", 0.1))
        self._head = ProjectionMLP(self.config.get("ssl_mlp_dim", 256),
                                   self.config.get("ssl_emb_dim", 64))

    def init_params(self, rng, batch):
        k_model, k_head = jax.random.split(rng)
        params = dict(super().init_params(k_model, batch))
        params[HEAD] = init_head(self._head, k_head,
                                 head_input(self.model, params, batch["image"]))
        return params

    def loss(self, params, aux, batch, rng, step, masked=True):
        require_key(batch, "image2", "SLIP", "data.two_views=True")
        u, pooled1, _ = image_features(self.model, params, batch["image"],
                                       self.keep_ids(rng, batch["image"], masked))
        _, pooled2, _ = image_features(self.model, params, batch["image2"])
        v = self.model.apply({"params": params}, batch["text"], method="encode_text")
        itc, metrics = self.itc((u, v), self.scalars(params))
        head = lambda x: self._head.apply({"params": params[HEAD]}, x)
        ssl, ssl_metrics = self._ssl(head(pooled1), head(pooled2))
        loss = itc + self.config.get("ssl_weight", 1.0) * ssl
        return loss, dict(metrics, **ssl_metrics, itc_loss=itc, ssl_loss=ssl), aux

