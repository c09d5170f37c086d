"""CLIP ViT vision tower (pre-layernorm, quick-GELU MLPs), run only up to the selected feature layer.

Shape legend: N images, P patch tokens per image (+1 for CLS), C vision width.
Module names mirror Hugging Face's CLIPVisionTransformer so checkpoints map key for key.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LlavaConfig, VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation x * sigmoid(1.702 x), elementwise, any shape."""
    return x * torch.sigmoid(1.702 * x)


class CLIPEmbeddings(nn.Module):
    """CLIP's patch embedding (a stride-p convolution, no bias), the CLS token and learned positions."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixels_N3HW: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels -> (N, P + 1, C): CLS first, then the patches in raster order."""
        patches_NCP = self.patch_embedding(pixels_N3HW.to(self.patch_embedding.weight.dtype)).flatten(2)
        patches_NPC = patches_NCP.transpose(1, 2)
        cls_N1C = self.class_embedding.expand(patches_NPC.shape[0], 1, -1)
        return torch.cat([cls_N1C, patches_NPC], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    """Multi-head self-attention over each image's tokens (no mask), with biases as in CLIP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        c = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x_NPC: torch.Tensor) -> torch.Tensor:
        """(N, P, C) -> (N, P, C)."""
        n, p, c = x_NPC.shape

        def heads(t):
            return t.view(n, p, self.num_heads, c // self.num_heads).transpose(1, 2)

        o_NHPD = F.scaled_dot_product_attention(heads(self.q_proj(x_NPC)), heads(self.k_proj(x_NPC)), heads(self.v_proj(x_NPC)))
        return self.out_proj(o_NHPD.transpose(1, 2).reshape(n, p, c))


class CLIPMLP(nn.Module):
    """fc1 -> quick-GELU (or GELU) -> fc2."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C)."""
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, C) -> (N, P, C)."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionTower(nn.Module):
    """Returns the hidden state of `vision_feature_layer`; the layers after it are not built.

    Their checkpoint weights (and post_layernorm, which feature extraction never uses) are carried by
    the Llava model as plain tensors so an export stays complete.
    """

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        v = cfg.vision
        self.embeddings = CLIPEmbeddings(v)
        self.pre_layrnorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)  # sic: HF's spelling
        self.layers = nn.ModuleList(CLIPEncoderLayer(v) for _ in range(cfg.num_vision_layers_run))
        self.keep_cls = cfg.vision_feature_select == "cls_patch"

    def forward(self, pixels_N3HW: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P, C) features of the selected layer (P includes CLS for cls_patch)."""
        x = self.pre_layrnorm(self.embeddings(pixels_N3HW))
        for layer in self.layers:
            x = layer(x)
        return x if self.keep_cls else x[:, 1:]
