"""Text Transformer tower (the text encoder of CLIP, Radford et al. 2021, and SigLIP, Zhai et
al. 2023), in Flax Linen.

tokens [N, L] int (0 = padding) -> features [N, width]:

    x        = E_tok[tokens] + E_pos[:L]                 [N, L, width]   (E_pos: `positions`)
    x        = Encoder(x, mask)   (pre-LN blocks + final LN, `transformer.Encoder`)
    features = pool(x)            'eos' | 'mean' | 'map' [N, width]

Padding: a sequence ends at its first 0. Every position from there on is padding, whatever
its id, so appending zeros or changing the ids after the first 0 does not change the
features. The attention mask hides padded keys from every query (bidirectional attention;
`causal=True` also hides later positions, as CLIP's text tower does):

    mask[n, q, k] = valid[n, k] (and k <= q if causal),   valid[n, k] = k < length[n].

Padded positions still get (unused) outputs; no pooling reads them.

Pooling: 'eos' takes the last non-pad token (position length - 1; the tokenizer's EOS where
it appends one; CLIP pools its EOT token this way); 'mean' averages the non-pad tokens;
'map' is attention pooling over the non-pad tokens (`transformer.MAPHead`); 'last' takes
position L - 1 whatever the padding (big_vision's SigLIP, whose texts are padded with EOS).
An all-padding row gives finite features (position 0 for 'eos', zeros for 'mean').

`pad_mask=False` drops the padding rule: every position is a token and attends to every
other (big_vision's text tower has no attention mask).

`dtype` (`compute.py`) is the compute dtype: bfloat16 gives bfloat16 features from float32
parameters (the embedding table is cast where it is read).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from contrastive.models import compute
from contrastive.models import transformer

POOLS = ('eos', 'mean', 'map', 'last')

# Preset sizes (fields of `TextTransformer`; vocab_size and context come from the tokenizer).
TEXT_SMALL = dict(width=128, depth=2, heads=4, mlp_dim=512)  # CPU; byte-level emoji names
TEXT_B = dict(width=768, depth=12, heads=12, mlp_dim=3072)  # "B", paired with ViT-B/16
# open_clip's CLIP text towers (contrastive/weights): byte-level BPE of 49,408 ids, 77 tokens,
# causal attention, the EOT token pooled (CLIP's EOT is the last non-pad token).
_CLIP_TEXT = dict(vocab_size=49408, context=77, causal=True, pool='eos', ln_eps=1e-5,
                  act='gelu')
TEXT_PRESETS = {'small': TEXT_SMALL, 'B': TEXT_B,
                'open_clip/ViT-B-32': dict(_CLIP_TEXT, width=512, depth=12, heads=8,
                                           mlp_dim=2048),
                'open_clip/ViT-B-16': dict(_CLIP_TEXT, width=512, depth=12, heads=8,
                                           mlp_dim=2048),
                'open_clip/ViT-L-14': dict(_CLIP_TEXT, width=768, depth=12, heads=12,
                                           mlp_dim=3072)}
# big_vision's SigLIP text towers: no attention mask, the last position pooled (texts padded
# with EOS or 0 to the context); vocab_size and context from the tokenizer.
_SIGLIP_TEXT = dict(pool='last', pad_mask=False)
TEXT_PRESETS.update({
    'big_vision/B': dict(_SIGLIP_TEXT, width=768, depth=12, heads=12, mlp_dim=3072),
    'big_vision/L': dict(_SIGLIP_TEXT, width=1024, depth=24, heads=16, mlp_dim=4096),
    'big_vision/So400m': dict(_SIGLIP_TEXT, width=1152, depth=27, heads=16, mlp_dim=4304)})


def sequence_lengths(tokens):
  """Number of tokens before the first 0 in each row: tokens [N, L] -> [N] int32."""
  return jnp.sum(jnp.cumprod(tokens != 0, axis=1), axis=1).astype(jnp.int32)


class TextTransformer(nn.Module):
  """Text tower: tokens [N, L] int, L <= context, 0 = padding -> features [N, width].

  Attributes:
    vocab_size: number of token ids (0, the padding id, included).
    context: maximum sequence length L (size of the learned position table).
    width, depth, heads, mlp_dim: Transformer sizes, as `vit.ViT`.
    pool: 'eos' (last non-pad token), 'mean' (over non-pad tokens) or 'map'.
    causal: also mask attention to later positions (CLIP); default bidirectional.
    positions: add the learned position table (False with depth 0 and 'mean' pooling: a bag
      of pieces, StarSpace-style, Wu et al. 2018: a piece counts the same at any position).
    dropout: dropout rate in the blocks when `train=True` (0: deterministic).
    dtype: compute dtype (`compute.py`); parameters stay float32.
    remat: '' or a name in `compute.REMAT_POLICIES`, applied to each block.
    act, ln_eps: the blocks' MLP activation and LayerNorm epsilon (`transformer`).
    pad_mask: id 0 ends a sequence (masked, not pooled); False: no padding (big_vision).
  """
  vocab_size: int = 32_000
  context: int = 64
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  pool: str = 'eos'
  causal: bool = False
  positions: bool = True
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: str = ''
  act: str = 'gelu_tanh'
  ln_eps: float = 1e-6
  pad_mask: bool = True

  def __post_init__(self):  # a wrong name or size fails when the tower is built, not later
    if self.pool not in POOLS:
      raise ValueError(f'pool must be one of {POOLS}, got {self.pool!r}.')
    transformer.check_sizes(self.width, self.depth, self.heads, self.mlp_dim)
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    if tokens.ndim != 2 or tokens.shape[1] > self.context:
      raise ValueError(f'tokens must be [N, L] with L <= context={self.context}, '
                       f'got shape {tuple(tokens.shape)}.')
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'tokens must be integer ids, got dtype {tokens.dtype}.')
    length = tokens.shape[1]
    lengths = (sequence_lengths(tokens) if self.pad_mask else
               jnp.full(tokens.shape[:1], length, jnp.int32))  # (N,)
    valid = jnp.arange(length)[None, :] < lengths[:, None]  # (N, L): True for real tokens
    ids = jnp.where(valid, tokens, 0)  # ids after the first 0 are padding, whatever they are
    x = nn.Embed(self.vocab_size, self.width, dtype=compute.flax_dtype(self.dtype),
                 name='token_embedding')(ids)  # (N, L, width)
    if self.positions:
      pos = self.param('pos_embedding', nn.initializers.normal(stddev=self.width**-0.5),
                       (1, self.context, self.width))
      x = x + pos[:, :length].astype(x.dtype)
    key_mask = valid[:, None, None, :]  # (N, 1, 1, L): keys every query may attend to
    mask = key_mask
    if self.causal:
      mask = key_mask & jnp.tril(jnp.ones((length, length), bool))[None, None]  # (N, 1, L, L)
    x = transformer.Encoder(self.depth, self.heads, self.mlp_dim, self.dropout, self.dtype,
                            self.remat, self.act, self.ln_eps, name='encoder')(
                                x, mask, train=train)  # (N, L, width)
    if self.pool == 'eos':
      last = jnp.maximum(lengths - 1, 0)
      return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    if self.pool == 'last':
      return x[:, -1]
    if self.pool == 'mean':
      w = valid.astype(x.dtype)[:, :, None]  # (N, L, 1)
      return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return transformer.MAPHead(self.heads, self.mlp_dim, self.dtype, self.act, self.ln_eps,
                               name='map_head')(x, mask=key_mask)
