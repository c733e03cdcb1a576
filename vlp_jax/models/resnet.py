"""ResNet image tower with GroupNorm and weight standardisation (ResNet-v2 / BiT style).

ALIGN (Jia et al. 2021) trains a convolutional image tower (EfficientNet) against a BERT text
tower; here the CNN is a pre-activation ResNet (He et al. 2016b) whose normalisation is
GroupNorm on weight-standardised convolutions (Kolesnikov et al. 2020, "BiT"). Neither keeps
running statistics, so the tower is a pure function of (params, images): no mutable
`batch_stats`, no train/eval switch, and an example's output never depends on the rest of the
batch (which a sharded contrastive batch would otherwise leak through BatchNorm).

Weight standardisation (per output channel, over the kernel's h, w and input axes):
    W_hat = (W - mean(W)) / sqrt(var(W) + eps)
Pre-activation residual unit ("basic": two 3x3 convolutions; "bottleneck": 1x1, 3x3, 1x1 at
a quarter of the width):
    y = relu(GN(x));  shortcut = x, or conv1x1_stride(y) when the shape changes
    out = shortcut + conv3x3(relu(GN(conv3x3_stride(y))))                    (basic)

Convolution kernels carry the logical axes ('conv_h', 'conv_w', 'conv_in', 'conv_out') and
GroupNorm scales/biases ('conv_out',); the default sharding rules map these names to None
(replicated), which suits towers of this size.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.registry import register_image_tower
from vlp_jax.nn.partitioning import logical, ones, zeros
from vlp_jax.nn.pooling import AttentionPool, masked_mean
from vlp_jax.nn.transformer import remat_policy

BLOCKS = ("basic", "bottleneck")
POOLS = ("gap", "map")
CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


class StdConv(nn.Module):
    """Convolution with a weight-standardised kernel: x [B, H, W, Cin] -> [B, H/s, W/s, Cout]."""

    features: int
    kernel_size: int
    strides: int = 1
    standardize: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", logical(nn.initializers.he_normal(), CONV_AXES),
                            (k, k, x.shape[-1], self.features))
        if self.standardize:
            mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
            var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
            kernel = (kernel - mean) * jax.lax.rsqrt(var + 1e-10)
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.strides, self.strides), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))


def group_norm(groups: int, channels: int, name: str, dtype=jnp.float32) -> nn.GroupNorm:
    """GroupNorm with min(groups, channels) groups; scale/bias annotated along `conv_out`."""
    groups = min(groups, channels)
    if channels % groups:
        raise ValueError(f"model.image.norm_groups={groups} does not divide {channels} channels")
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype, name=name,
                        scale_init=ones(("conv_out",)), bias_init=zeros(("conv_out",)))


class ResidualUnit(nn.Module):
    """Pre-activation residual unit: [B, H, W, Cin] -> [B, H/s, W/s, features]."""

    features: int
    strides: int
    block: str = "basic"
    norm_groups: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        y = nn.relu(group_norm(self.norm_groups, cin, "gn0", self.dtype)(x))
        shortcut = x
        if self.strides != 1 or cin != self.features:
            shortcut = StdConv(self.features, 1, self.strides, dtype=self.dtype, name="proj")(y)
        if self.block == "basic":
            y = StdConv(self.features, 3, self.strides, dtype=self.dtype, name="conv0")(y)
            y = nn.relu(group_norm(self.norm_groups, self.features, "gn1", self.dtype)(y))
            y = StdConv(self.features, 3, dtype=self.dtype, name="conv1")(y)
        else:
            mid = max(self.features // 4, 1)
            y = StdConv(mid, 1, dtype=self.dtype, name="conv0")(y)
            y = nn.relu(group_norm(self.norm_groups, mid, "gn1", self.dtype)(y))
            y = StdConv(mid, 3, self.strides, dtype=self.dtype, name="conv1")(y)
            y = nn.relu(group_norm(self.norm_groups, mid, "gn2", self.dtype)(y))
            y = StdConv(self.features, 1, dtype=self.dtype, name="conv2")(y)
        return shortcut + y


class ResNet(nn.Module):
    """Pre-activation ResNet image tower, interchangeable with `ViT` in the dual encoder.

    Attributes:
      width: channels of the stem and the first stage; stage i has width * 2**i
        (times 4 for bottleneck units, whose inner width is a quarter).
      stage_sizes: residual units per stage, e.g. (2, 2, 2, 2) = ResNet-18-like.
      block: 'basic' or 'bottleneck'.
      image_size: side of the square input (checked, as for the ViT).
      stem_kernel, stem_stride, stem_pool: the stem convolution (7, 2, True for 224 px;
        the defaults 3, 1, False suit 16-64 px images).
      norm_groups: GroupNorm groups (BiT: 32).
      pool: 'gap' (global average, as ResNet/EfficientNet) or 'map' (attention pooling).

    Call: images [B, H, W, 3]; keep_ids must be None (patch masking needs a ViT).
    Returns: (pooled [B, C], tokens [B, h*w, C]) with h, w the final feature-map size and
      C the last stage's channels.
    """

    width: int
    stage_sizes: Sequence[int]
    image_size: int
    block: str = "basic"
    stem_kernel: int = 3
    stem_stride: int = 1
    stem_pool: bool = False
    norm_groups: int = 8
    pool: str = "gap"
    remat: bool = False
    dtype: Any = jnp.float32
    remat_policy: str = "nothing_saveable"
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, images, keep_ids=None):
        if keep_ids is not None:
            raise ValueError("the ResNet image tower cannot encode a subset of patches; "
                             "method.mask_ratio > 0 (FLIP) needs model.image.type='vit'")
        if self.block not in BLOCKS:
            raise ValueError(f"model.image.block must be one of {BLOCKS}, got {self.block!r}")
        if self.pool not in POOLS:
            raise ValueError(f"model.image.pool must be one of {POOLS}, got {self.pool!r}")
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"ResNet built for {self.image_size}px images got {images.shape[1:3]}")
        x = StdConv(self.width, self.stem_kernel, self.stem_stride, dtype=self.dtype,
                    name="stem")(images.astype(self.dtype))
        if self.stem_pool:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        unit_cls = (nn.remat(ResidualUnit, policy=remat_policy(self.remat_policy)) if self.remat
                    else ResidualUnit)
        expansion = 4 if self.block == "bottleneck" else 1
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                x = unit_cls(self.width * 2 ** i * expansion, 2 if (i > 0 and j == 0) else 1,
                             self.block, self.norm_groups, self.dtype,
                             name=f"stage{i}_unit{j}")(x)
        x = nn.relu(group_norm(self.norm_groups, x.shape[-1], "final_norm", self.dtype)(x))
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        if self.pool == "gap":
            pooled = masked_mean(tokens)
        else:
            pooled = AttentionPool(max(c // 64, 1), 4 * c, self.dtype, self.attention_implementation,
                                   name="map")(tokens)
        return pooled, tokens


@register_image_tower("resnet")
def build_resnet(cfg, dtype=jnp.float32, remat=False, remat_policy="nothing_saveable",
                 scan_layers=False, attention_implementation=None, dropout_rate=0.0) -> ResNet:
    """`model.image` section -> ResNet (registered as image tower type 'resnet').

    The stack options are the model's (shared with its text tower): remat / remat_policy
    apply to the residual units, attention_implementation to the MAP pool, scan_layers only
    to the transformer towers (residual stages are not identical layers); dropout_rate must be 0.
    """
    del scan_layers
    if dropout_rate:
        raise ValueError("the ResNet image tower has no dropout; model.dropout_rate must be 0")
    return ResNet(width=cfg.width, stage_sizes=tuple(cfg.stage_sizes), image_size=cfg.image_size,
                  block=cfg.get("block", "basic"), stem_kernel=cfg.get("stem_kernel", 3),
                  stem_stride=cfg.get("stem_stride", 1), stem_pool=cfg.get("stem_pool", False),
                  norm_groups=cfg.get("norm_groups", 8), pool=cfg.get("pool", "gap"),
                  remat=remat, dtype=dtype, remat_policy=remat_policy,
                  attention_implementation=attention_implementation)
