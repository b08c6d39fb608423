"""Writes the open_clip parity fixtures under tests/data/ (run once; CI reads them without torch).

An importer of open_clip CLIP checkpoints into the Flax towers is checked against these files:
for three tiny models that mirror open_clip's `ViT-B-32`, `ViT-B-16` and `ViT-L-14` configs
(class token, ln_pre, pre-LN residual blocks with torch MultiheadAttention, ln_post on all tokens
then the class token, `proj`; text: causal mask, ln_final, EOT pooling by argmax of the token
ids, `text_projection`; LayerNorm eps 1e-5), each with every parameter redrawn at random so a
swapped or ignored LayerNorm gamma/beta, bias or embedding changes the outputs, it stores

  open_clip_<name>.safetensors  the model's state_dict as open_clip names it, float32;
  open_clip_<name>.npz          images_uint8_<i> (3 RGB images, HxW 40x57, 64x48, 32x32),
                                pixels [3, 3, 32, 32] (open_clip's eval preprocess, NCHW),
                                image_embeddings [3, 16] = encode_image(pixels) (not normalized),
                                tokens [4, 77] int64 (SOT 510, pieces in [1, 509], EOT 511, zeros),
                                text_embeddings [4, 16] = encode_text(tokens) (not normalized),
                                logit_scale, config (JSON: the cfg dicts, quick_gelu, versions,
                                the preprocess's size/mean/std/interpolation/resize mode).

Tiny configs (embed_dim 16; text: context 77, vocab 512, width 32, 2 heads, 2 layers):
  vit_b_32            image 32, patch 8, width 32, 2 layers, head_width 16, mlp_ratio 4, GELU
  vit_b_16            the same with patch 4, GELU
  vit_l_14_quickgelu  the same with patch 4 (14 does not divide 32), QuickGELU as OpenAI's L-14
The 40x57 image makes the center crop's offset (45 - 32) / 2 = 6.5, which Python's round()
takes to 6; the 64x48 one is resized to int(42.67) = 42 rows.

Torch is not a project dependency; this runs from its own environment only (it imports neither
jax nor `contrastive`):

  python3 -m venv /tmp/openclipenv
  /tmp/openclipenv/bin/pip install torch==2.14.1 torchvision==0.29.1
  /tmp/openclipenv/bin/pip install open-clip-torch safetensors
  /tmp/openclipenv/bin/python benchmarks/make_parity_fixtures.py --out tests/data
"""

import argparse
import json
import math
import os

import numpy as np
import open_clip
import PIL
import safetensors.torch
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

EMBED_DIM = 16
IMAGE_SIZE = 32
IMAGE_SHAPES = ((40, 57), (64, 48), (32, 32))  # (height, width)
TOKEN_LENGTHS = (2, 7, 30, 77)  # SOT + pieces + EOT
SOT, EOT = 510, 511
TEXT_CFG = dict(context_length=77, vocab_size=512, width=32, heads=2, layers=2)

# (fixture name, open_clip config it mirrors, patch size, quick_gelu)
ARCHS = (
  ('vit_b_32', 'ViT-B-32', 8, False),
  ('vit_b_16', 'ViT-B-16', 4, False),
  ('vit_l_14_quickgelu', 'ViT-L-14', 4, True),
)


def vision_cfg(patch_size):
  return dict(image_size=IMAGE_SIZE, patch_size=patch_size, width=32, layers=2, head_width=16,
              mlp_ratio=4.0)


def random_value(name, shape, gen):
  """A seeded draw of a sensible scale for the parameter `name`."""
  normal = torch.randn(shape, generator=gen)
  leaf = name.rsplit('.', 1)[-1]
  if name == 'logit_scale':
    return torch.full(shape, math.log(1 / 0.07))
  if 'ln_' in name and leaf == 'weight':  # ln_pre, ln_1, ln_2, ln_post, ln_final
    return 1 + 0.1 * normal
  if leaf.endswith('bias'):  # LayerNorm beta, linear and in_proj biases
    return 0.1 * normal
  if name.endswith('class_embedding') or name.endswith('positional_embedding'):
    return 0.1 * normal
  if name == 'token_embedding.weight':
    return 0.5 * normal
  if name in ('visual.proj', 'text_projection'):  # [width, embed_dim], used as x @ proj
    return normal / math.sqrt(shape[0])
  # torch weights [out, in, ...]: unit-variance outputs, so GELU and QuickGELU differ visibly
  return normal / math.sqrt(math.prod(shape[1:]))


def build_model(index, patch_size, quick_gelu):
  torch.manual_seed(index)
  model = open_clip.CLIP(embed_dim=EMBED_DIM, vision_cfg=vision_cfg(patch_size),
                         text_cfg=dict(TEXT_CFG), quick_gelu=quick_gelu)
  gen = torch.Generator().manual_seed(index)
  persistent = set(model.state_dict())
  with torch.no_grad():
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
      if name not in persistent:  # the text causal mask (non-persistent buffer) stays as built
        continue
      if tensor.is_floating_point():
        tensor.copy_(random_value(name, tuple(tensor.shape), gen))
  return model.float().eval()


def make_images(seed):
  """Smooth random colour gradients plus noise, uint8 HxWx3."""
  rng = np.random.default_rng(seed)
  images = []
  for height, width in IMAGE_SHAPES:
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing='ij')
    base = rng.uniform(40, 215, 3)
    slope = rng.uniform(-80, 80, (2, 3))
    wave = 30 * np.sin(2 * np.pi * (rng.uniform(1, 3) * x + rng.uniform(1, 3) * y))
    image = base + x[..., None] * slope[0] + y[..., None] * slope[1] + wave[..., None]
    image = image + rng.normal(0, 12, image.shape)
    images.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
  return images


def make_tokens(seed):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(TOKEN_LENGTHS), TEXT_CFG['context_length']), np.int64)
  for row, length in enumerate(TOKEN_LENGTHS):
    tokens[row, 0] = SOT
    tokens[row, 1:length - 1] = rng.integers(1, SOT, length - 2)  # pieces in [1, 509]
    tokens[row, length - 1] = EOT
  return tokens


def preprocess_info(transform):
  """Reads the eval preprocess's settings off open_clip's transform object."""
  steps = {type(step).__name__: step for step in transform.transforms}
  resize, crop, norm = steps['Resize'], steps['CenterCrop'], steps['Normalize']
  assert isinstance(resize.size, int), resize.size  # int size: shorter side -> size
  return dict(
    image_size=IMAGE_SIZE, resize_mode='shortest', resize_size=resize.size,
    interpolation=resize.interpolation.value, antialias=resize.antialias,
    center_crop=list(crop.size), mean=list(norm.mean), std=list(norm.std),
    openai_dataset_mean=list(open_clip.OPENAI_DATASET_MEAN),
    openai_dataset_std=list(open_clip.OPENAI_DATASET_STD),
    steps=[repr(step) for step in transform.transforms])


def config_json(mirror, patch_size, quick_gelu, transform):
  return json.dumps(dict(
    mirrors=mirror, embed_dim=EMBED_DIM, vision_cfg=vision_cfg(patch_size), text_cfg=TEXT_CFG,
    quick_gelu=quick_gelu, act='QuickGELU' if quick_gelu else 'GELU(approximate=none)',
    layer_norm_eps=1e-5, sot_id=SOT, eot_id=EOT, text_pool_type='argmax',
    open_clip_version=open_clip.__version__, torch_version=torch.__version__,
    torchvision_version=torchvision.__version__, pillow_version=PIL.__version__,
    preprocess=preprocess_info(transform)), sort_keys=True)


def write_fixture(out, index, name, mirror, patch_size, quick_gelu):
  model = build_model(index, patch_size, quick_gelu)
  transform = open_clip.image_transform(IMAGE_SIZE, is_train=False)
  images = make_images(100 + index)
  pixels = torch.stack([transform(Image.fromarray(image)) for image in images])
  tokens = make_tokens(200 + index)
  with torch.no_grad():
    image_embeddings = model.encode_image(pixels)
    text_embeddings = model.encode_text(torch.from_numpy(tokens))
  state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
  safetensors.torch.save_file(state, os.path.join(out, f'open_clip_{name}.safetensors'))
  arrays = {f'images_uint8_{i}': image for i, image in enumerate(images)}
  arrays.update(
    pixels=pixels.numpy().astype(np.float32), tokens=tokens,
    image_embeddings=image_embeddings.numpy().astype(np.float32),
    text_embeddings=text_embeddings.numpy().astype(np.float32),
    logit_scale=np.float32(model.logit_scale.item()),
    config=np.array(config_json(mirror, patch_size, quick_gelu, transform)))
  np.savez_compressed(os.path.join(out, f'open_clip_{name}.npz'), **arrays)
  print(name, 'image_embeddings', tuple(image_embeddings.shape), 'text_embeddings',
        tuple(text_embeddings.shape))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='tests/data')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  torch.set_num_threads(1)
  for index, (name, mirror, patch_size, quick_gelu) in enumerate(ARCHS):
    write_fixture(args.out, index, name, mirror, patch_size, quick_gelu)


if __name__ == '__main__':
  main()
