"""Diffusion Transformer (Peebles & Xie, 2023), layer for layer as facebookresearch/DiT.

Module names follow the official code (`x_embedder`, `t_embedder`, `y_embedder`,
`blocks.i.attn.qkv`, `blocks.i.adaLN_modulation.1`, `final_layer`) so official
checkpoints load by key and bit configurations read like the paper. Besides the
usual forward, the network runs a slice of its blocks (`embed`, `run_blocks`,
`head`) so a search can start an evaluation where the changed layers begin. With
`per_block_embedders`, blocks 1.. get their own embedders (`block_embedders.i`), outside
`blocks` so they stay out of the quantizable layers, and the conditioning is (N, depth, D).
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DiTConfig:
    input_size: int = 32          # latent (or pixel) side length
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0 adds the null class used by classifier-free guidance
    num_classes: int = 1000
    learn_sigma: bool = True
    freq_shift: float = 0.0       # diffusers' DiT divides frequencies by (half - 1): freq_shift = 1
    norm_eps: float = 1e-6
    mlp_norm_eps: float | None = None  # eps of the norm before the MLP; None = norm_eps (diffusers' DiT: 1e-5)
    # One timestep + class embedder per block, as diffusers' DiTTransformer2DModel holds (a DiT trained
    # natively in diffusers learns them apart). Off: the official single pair, `t_embedder`/`y_embedder`.
    per_block_embedders: bool = False

    def to_dict(self):
        return asdict(self)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Image to tokens with one strided convolution (timm's PatchEmbed, key `proj`)."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps to vectors: sinusoidal frequencies, then a two-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256, freq_shift=0.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000, freq_shift=0.0):
        """[cos | sin] of t at geometric frequencies, as the official code orders them."""
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / (half - freq_shift))
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        freq = self.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels to vectors; index `num_classes` is the null class of classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class ConditionEmbedder(nn.Module):
    """A timestep and a class embedder for one block (diffusers keeps one pair per block)."""

    def __init__(self, config):
        super().__init__()
        self.t_embedder = TimestepEmbedder(config.hidden_size, freq_shift=config.freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)

    def forward(self, t, labels):
        """labels already carry any dropped (null) classes."""
        return self.t_embedder(t) + self.y_embedder.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's layout)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio, norm_eps, mlp_norm_eps=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.attn = Attention(hidden_size, num_heads)
        mlp_eps = norm_eps if mlp_norm_eps is None else mlp_norm_eps
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, norm_eps):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def check_config(config):
    """`config` if it describes a DiT that runs, else ValueError: refused where a model is built (init,
    every loader), not at its first forward's reshape or in a division by its zero layers."""
    for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"DiT {name} must be a positive integer, got {value!r}")
    if config.hidden_size % config.num_heads:
        raise ValueError(f"DiT hidden_size {config.hidden_size} is not a multiple of num_heads {config.num_heads}")
    if config.hidden_size % 4:
        raise ValueError(f"DiT hidden_size {config.hidden_size} is not a multiple of 4, which its 2-D sin-cos "
                         "position embedding needs")
    if config.input_size % config.patch_size:
        raise ValueError(f"DiT input_size {config.input_size} is not a multiple of patch_size {config.patch_size}")
    return config


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        check_config(config)
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * 2 if config.learn_sigma else config.in_channels
        self.patch_size = config.patch_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size, freq_shift=config.freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        num_patches = (config.input_size // config.patch_size) ** 2
        # Fixed sin-cos position embedding; a parameter (not a buffer) so the official key loads.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, config.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            DiTBlock(config.hidden_size, config.num_heads, config.mlp_ratio, config.norm_eps, config.mlp_norm_eps)
            for _ in range(config.depth)
        ])
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, self.out_channels, config.norm_eps)
        if config.per_block_embedders:  # block 0 (and the final layer) read t_embedder/y_embedder
            self.block_embedders = nn.ModuleDict({str(i): ConditionEmbedder(config) for i in range(1, config.depth)})
        self.initialize_weights()

    def initialize_weights(self):
        """The official initialisation: xavier linears, zero adaLN and output (the 'Zero' in adaLN-Zero)."""
        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(basic_init)
        grid = int(self.pos_embed.shape[1] ** 0.5)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.config.hidden_size, grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for embedder in getattr(self, "block_embedders", {}).values():
            nn.init.normal_(embedder.y_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(embedder.t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x, t, y, force_drop_ids=None):
        """Inputs to (tokens, conditioning): what block 0 receives. The conditioning is (N, D), or
        (N, depth, D) with per-block embedders (row i for block i). x is cast to the model's dtype: samplers
        and calibration sets keep latents in float32."""
        tokens = self.x_embedder(x.to(self.pos_embed.dtype)) + self.pos_embed
        if not self.config.per_block_embedders:
            return tokens, self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        if (self.training and self.y_embedder.dropout_prob > 0) or force_drop_ids is not None:
            y = self.y_embedder.token_drop(y, force_drop_ids)  # one draw shared by every block's embedder
        first = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        return tokens, torch.stack([first, *(embedder(t, y) for embedder in self.block_embedders.values())], dim=1)

    def run_blocks(self, tokens, c, start=0, end=None):
        """Blocks start..end-1 on hidden tokens: a slice of the network for segment-wise evaluation."""
        for index in range(len(self.blocks))[start:end]:
            tokens = self.blocks[index](tokens, c[:, index] if c.dim() == 3 else c)
        return tokens

    def head(self, tokens, c):
        return self.unpatchify(self.final_layer(tokens, c[:, 0] if c.dim() == 3 else c))

    def forward(self, x, t, y, force_drop_ids=None):
        """x: (N, C, H, W) noisy input, t: (N,) timesteps, y: (N,) labels -> (N, out_channels, H, W)."""
        tokens, c = self.embed(x, t, y, force_drop_ids)
        return self.head(self.run_blocks(tokens, c), c)

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels=None):
        """Classifier-free guidance over a batch whose second half carries the null label.

        Guidance applies to the noise channels (`in_channels`). `guidance_channels=3` reproduces
        the official code, which guides only the first three of the four latent channels.
        """
        half = x[: len(x) // 2]
        cond, uncond = self.forward(torch.cat([half, half]), t, y).chunk(2)
        channels = self.in_channels if guidance_channels is None else guidance_channels
        guided = guided_output(cond, uncond, cfg_scale, channels)
        return torch.cat([guided, torch.cat([guided[:, :channels], uncond[:, channels:]], dim=1)])


def guided_output(cond, uncond, cfg_scale, channels):
    """What the sampler reads for conditional rows and their null pairs: guidance on the first `channels`
    channels (the noise), the conditional row's own values beyond them (the learned variance)."""
    eps = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([eps, cond[:, channels:]], dim=1)


def sincos_pos_embed_2d(dim, grid_size):
    """(grid_size**2, dim) fixed embedding: half the channels encode rows, half columns (MAE's layout)."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # first grid varies along width
    emb_a = _sincos_1d(dim // 2, grid_w.reshape(-1))
    emb_b = _sincos_1d(dim // 2, grid_h.reshape(-1))
    return torch.cat([emb_a, emb_b], dim=1).float()


def _sincos_1d(dim, positions):
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
