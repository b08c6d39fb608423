"""NegCLIP composition negatives: the caption's own words in another order, and the ARO-style
order-sensitivity score that tells whether a model notices.

Yuksekgonul et al. show that CLIP-style models retrieve as well from a caption with its words
shuffled as from the caption itself (they behave like bags of words), and that adding such
word-order perturbations of each caption as hard negatives (NegCLIP) teaches order. The paper
swaps linguistic elements found by a parser (nouns, adjectives, noun and verb phrases); here,
without a POS tagger, two perturbations of the whitespace-split words stand in:

  'shuffle'  the words in a random order;
  'swap'     two content words (not in `STOP_WORDS`) exchanged, e.g. "a dog chasing a cat" ->
             "a cat chasing a dog".

Rule: a perturbation is a permutation of the caption's words (the same multiset) whose word
sequence differs from the original. A caption with fewer than two distinct words has no such
permutation ("dog", "a a a", ""): it gets no negative (None, masked invalid).

Everything here but `order_sensitivity` is host-side Python and NumPy, deterministic from a seed.

References:
  Yuksekgonul, Bianchi, Kalluri, Jurafsky & Zou 2023, "When and why vision-language models
  behave like bags-of-words, and what to do about it?" (ICLR, arXiv:2210.01936): NegCLIP's
  hard negatives (Section 5) and the COCO / Flickr30k-Order evaluation (Section 3).
"""

import numbers

import jax.numpy as jnp
import numpy as np

from contrastive.losses import common

KINDS = ('swap', 'shuffle')

STOP_WORDS = frozenset("""
    a an the this that these those some its his her their our your my
    of in on at to into onto from with without by for near next over under above below behind
    beside between through up down out off around across along
    and or but while as than then there here
    is are was were be been being am has have had do does it they he she we you i
""".split())


def _is_content(word):
  """A word not in STOP_WORDS once lower-cased and stripped of surrounding punctuation."""
  return word.lower().strip('.,;:!?"\'()[]') not in STOP_WORDS


def _swap(words, rng):
  """words with two distinct words exchanged, content words preferred (words: >= 2 distinct)."""
  content = [i for i, w in enumerate(words) if _is_content(w)]
  if len({words[i] for i in content}) < 2:  # fewer than two distinct content words: any two
    content = list(range(len(words)))
  i = content[rng.integers(len(content))]  # every position has a distinct partner in `content`
  partners = [j for j in content if words[j] != words[i]]
  j = partners[rng.integers(len(partners))]
  out = list(words)
  out[i], out[j] = out[j], out[i]
  return out


def _shuffle(words, rng):
  """A random order of words; a draw equal to the original is rotated by one position, which
  differs from it whenever the words are not all equal."""
  out = [words[p] for p in rng.permutation(len(words))]
  return words[1:] + words[:1] if out == words else out


def perturb_order(caption, kind, rng):
  """One word-order perturbation of `caption`, or None if it has < 2 distinct words.

  Words are the whitespace-separated tokens (punctuation stays attached); the result joins
  them with single spaces. Rule: the result's words are a permutation of the caption's (the
  same multiset) and their sequence is never the original's. 'shuffle' permutes all words
  (uniformly, except that the identity, or a permutation that only exchanges equal words, is
  replaced by the rotation w_2 .. w_n w_1); 'swap' exchanges two distinct words, both drawn
  among the content words (not in `STOP_WORDS`), or among all words when fewer than two
  distinct content words exist. One call draws a fixed number of values from `rng`.

  Args:
    caption: the text.
    kind: 'shuffle' or 'swap'.
    rng: a `numpy.random.Generator`.

  Returns:
    the perturbed caption, or None when no perturbation exists (fewer than two distinct words).

  References:
    Yuksekgonul et al. 2023 (ICLR, arXiv:2210.01936), NegCLIP's swapped captions.

  >>> perturb_order('a dog chasing a cat', 'swap', np.random.default_rng(2))
  'a cat chasing a dog'
  """
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}; got {kind!r}.')
  words = caption.split()
  if len(set(words)) < 2:
    return None
  return ' '.join(_shuffle(words, rng) if kind == 'shuffle' else _swap(words, rng))


def negative_captions(captions, num, seed, indices=None):
  """NegCLIP hard-negative captions: `num` word-order perturbations of every caption.

  Perturbation k of a caption is of kind KINDS[k % 2] ('swap', 'shuffle', 'swap', ...), drawn
  from `np.random.default_rng([seed, i])` for caption i (i = indices[n] for the n-th caption if
  given: e.g. its row in the dataset): the same (seed, i, caption) give the same negatives
  whatever the other captions are. Perturbations of one caption may repeat
  (short captions have few orders). A caption with < 2 distinct words has no valid negative:
  its entries are the caption itself, marked False in the mask, so the whole grid can go
  through `Tokenizer.encode`; an entry marked False is then a negative of no row
  (`objectives.text_negatives`).

  Args:
    captions: N strings.
    num: negatives per caption, an int >= 1.
    seed: an int >= 0.
    indices: optional N ints >= 0, the captions' own indices (default 0..N-1).

  Returns:
    (negatives, valid): negatives a list of N lists of `num` strings; valid [N, num] bool NumPy.

  References:
    Yuksekgonul et al. 2023 (ICLR, arXiv:2210.01936), Section 5 (NegCLIP).
  """
  if isinstance(num, bool) or not isinstance(num, numbers.Integral) or num < 1:
    raise ValueError(f'num must be an int >= 1; got {num!r}.')
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ValueError(f'seed must be an int >= 0; got {seed!r}.')
  indices = range(len(captions)) if indices is None else [int(i) for i in indices]
  if len(indices) != len(captions) or min(indices, default=0) < 0:
    raise ValueError(f'indices must be {len(captions)} ints >= 0 (one per caption).')
  negatives, valid = [], np.zeros((len(captions), num), bool)
  for n, (i, caption) in enumerate(zip(indices, captions)):
    rng = np.random.default_rng([seed, i])
    row = [perturb_order(caption, KINDS[k % 2], rng) for k in range(num)]
    valid[n] = [neg is not None for neg in row]
    negatives.append([caption if neg is None else neg for neg in row])
  return negatives, valid


def order_sensitivity(image, caption, perturbed, valid=None):
  """Order sensitivity (ARO's COCO / Flickr30k-Order accuracy): the share of images whose true
  caption scores strictly higher than every valid perturbation of it.

  With s(u, v) the cosine similarity, image i counts as a hit when

      s(image_i, caption_i) > s(image_i, perturbed_ip)   for every p with valid_ip,

  a tie being a miss. Images without any valid perturbation carry no information about order
  and are left out of the share (numerator and denominator); with none left the result is NaN.
  A bag-of-words model scores about 1 / (P + 1) with P distinct perturbations.

  Args:
    image: [N, D] image embeddings.
    caption: [N, D] embeddings of the true captions.
    perturbed: [N, P, D] embeddings of each caption's P perturbations.
    valid: optional [N, P] bool, False for the entries to ignore (`negative_captions`' mask).

  Returns:
    a float32 scalar (float64 for float64 inputs) in [0, 1], or NaN.

  References:
    Yuksekgonul et al. 2023 (ICLR, arXiv:2210.01936), Section 3 (COCO & Flickr30k-Order).
  """
  image, caption, perturbed = (jnp.asarray(x) for x in (image, caption, perturbed))
  if image.ndim != 2 or caption.shape != image.shape or perturbed.ndim != 3 or (
      perturbed.shape[::2] != image.shape):
    raise ValueError(f'need image [N, D], caption [N, D] and perturbed [N, P, D]; got image: '
                     f'{tuple(image.shape)}, caption: {tuple(caption.shape)}, perturbed: '
                     f'{tuple(perturbed.shape)}.')
  if valid is None:
    valid = jnp.ones(perturbed.shape[:2], bool)
  elif tuple(np.shape(valid)) != perturbed.shape[:2] or jnp.asarray(valid).dtype != jnp.bool_:
    raise ValueError(f'valid must be bool [N, P] = {perturbed.shape[:2]}; got '
                     f'{jnp.asarray(valid).dtype} {tuple(np.shape(valid))}.')
  # One einsum for the true caption (column 0) and its perturbations, so equal embeddings tie.
  texts = jnp.concatenate([caption[:, None], perturbed], axis=1)  # (N, 1 + P, D)
  sim = jnp.einsum('nd,npd->np', common.l2_normalize(image), common.l2_normalize(texts))
  beaten = jnp.any(valid & (sim[:, 1:] >= sim[:, :1]), axis=1)  # (N,) a perturbation ties or wins
  counted = jnp.any(valid, axis=1)  # (N,) images with at least one valid perturbation
  return jnp.sum(counted & ~beaten) / jnp.sum(counted).astype(sim.dtype)
