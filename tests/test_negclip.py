"""NegCLIP word-order negatives and the order-sensitivity score (Yuksekgonul et al. 2023).

The perturbations are checked against their rule on many random captions (a permutation of the
words, never the original sequence, None below two distinct words); `order_sensitivity` against
a NumPy re-derivation in float64, ties and invalid perturbations included.
"""

import jax
import numpy as np
import pytest

from contrastive.negatives import negclip
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

order_sensitivity = jax.jit(negclip.order_sensitivity)

# Stop words and content words, with repeats, so both 'swap' branches are drawn.
VOCAB = ['a', 'the', 'on', 'of', 'dog', 'cat', 'red', 'sits', 'Dog', 'mat.']


def random_captions(rng, count):
  lengths = rng.integers(0, 9, count)
  pool = [rng.choice(VOCAB[:rng.integers(1, len(VOCAB) + 1)], n) for n in lengths]
  fixed = ['', 'dog', 'a a a', 'a b', 'b a', 'a a b', 'the the cat', 'dog dog cat cat',
           'a dog on a mat.', 'Dog dog']
  return fixed + [' '.join(words) for words in pool]


@pytest.mark.parametrize('kind', negclip.KINDS)
def test_perturbation_rule(kind):
  """Distinct words >= 2: a permutation of the words, never their original sequence; else None."""
  rng = np.random.default_rng(0)
  captions = random_captions(rng, 2000)
  for caption in captions:
    words = caption.split()
    out = negclip.perturb_order(caption, kind, rng)
    if len(set(words)) < 2:
      assert out is None, caption
    else:
      assert sorted(out.split()) == sorted(words), (caption, out)
      assert out.split() != words, (caption, out)


def test_shuffle_of_two_words_is_always_the_other_order():
  """A draw equal to the original is rotated: with two words the identity never comes back."""
  for seed in range(20):
    rng = np.random.default_rng(seed)
    assert negclip.perturb_order('a b', 'shuffle', rng) == 'b a'
    assert negclip.perturb_order('a a b', 'shuffle', rng) in ('a b a', 'b a a')


def test_swap_exchanges_two_content_words_or_falls_back():
  rng = np.random.default_rng(1)
  seen = set()
  for _ in range(50):
    out = negclip.perturb_order('a dog chasing a cat', 'swap', rng).split()
    assert out[0] == out[3] == 'a'  # stop words stay
    assert sum(w != o for w, o in zip(out, 'a dog chasing a cat'.split())) == 2
    seen.add(' '.join(out))
  assert seen == {'a chasing dog a cat', 'a cat chasing a dog', 'a dog cat a chasing'}
  # One distinct content word ('b'): any two distinct words are swapped.
  assert {negclip.perturb_order('a a b', 'swap', rng) for _ in range(50)} == {'b a a', 'a b a'}


def test_negative_captions_deterministic_and_masked():
  captions = ['a dog chasing a cat', 'dog', 'a red cat on the mat', 'the the']
  negatives, valid = negclip.negative_captions(captions, 4, seed=3)
  again, valid_again = negclip.negative_captions(captions, 4, seed=3)
  assert negatives == again
  np.testing.assert_array_equal(valid, valid_again)
  np.testing.assert_array_equal(valid, [[True] * 4, [False] * 4, [True] * 4, [False] * 4])
  assert valid.dtype == bool and len(negatives) == 4 and all(len(r) == 4 for r in negatives)
  assert negatives[1] == ['dog'] * 4 and negatives[3] == ['the the'] * 4  # placeholders
  for k in (0, 2):  # kinds alternate: 'swap' first, so entries 0, 2 differ in two positions
    changed = [w != o for w, o in zip(negatives[0][k].split(), captions[0].split())]
    assert sum(changed) == 2
  # Caption i's negatives depend on (seed, i, caption) only, not on the other captions.
  other, _ = negclip.negative_captions(['a b c d e'] + captions[1:], 4, seed=3)
  assert other[2] == negatives[2]
  assert negclip.negative_captions(captions, 4, seed=4)[0] != negatives


def sensitivity_numpy(image, caption, perturbed, valid):
  """ARO's order accuracy, image by image: strict wins over every valid perturbation."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  hits, counted = 0, 0
  for i in range(len(image)):
    if not valid[i].any():
      continue
    true = unit(image[i]) @ unit(caption[i])
    others = [unit(image[i]) @ unit(perturbed[i, p]) for p in range(perturbed.shape[1])
              if valid[i, p]]
    counted += 1
    hits += all(true > s for s in others)
  return hits / counted


def test_order_sensitivity_against_numpy():
  rng = np.random.default_rng(0)
  n, p, d = 40, 5, 6
  image = rng.standard_normal((n, d))
  caption = image + 0.8 * rng.standard_normal((n, d))  # mostly, not always, the best
  perturbed = image[:, None] + rng.standard_normal((n, p, d))
  valid = rng.random((n, p)) < 0.7
  valid[:3] = False  # no valid perturbation: left out
  perturbed[3:10, 1] = 2.0 * caption[3:10]  # a tie with a valid entry: a miss
  valid[3:10, 1] = True
  perturbed[10:16, 2] = caption[10:16]  # a tie with an invalid entry: ignored
  valid[10:16, 2] = False
  perturbed[16:20] = -caption[16:20, None]  # every perturbation loses
  valid[16:20] = True
  got = float(order_sensitivity(image, caption, perturbed, valid))
  want = sensitivity_numpy(image, caption, perturbed, valid)
  assert 0.2 < want < 0.8  # the planted cases do not decide it alone
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
  # Without a mask every perturbation counts.
  np.testing.assert_allclose(float(order_sensitivity(image, caption, perturbed)),
                             sensitivity_numpy(image, caption, perturbed, np.ones((n, p), bool)),
                             rtol=0, atol=1e-12)
  assert np.isnan(float(order_sensitivity(image, caption, perturbed, valid & False)))


def test_bad_inputs():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=r"kind must be one of \('swap', 'shuffle'\); got 'rev"):
    negclip.perturb_order('a b', 'reverse', rng)
  with pytest.raises(ValueError, match='num must be an int >= 1; got 0'):
    negclip.negative_captions(['a b'], 0, seed=0)
  with pytest.raises(ValueError, match='seed must be an int >= 0; got -1'):
    negclip.negative_captions(['a b'], 2, seed=-1)
  x = np.ones((4, 3))
  with pytest.raises(ValueError, match=r'perturbed \[N, P, D\]; got .* perturbed: \(4, 3\)'):
    negclip.order_sensitivity(x, x, x)
  with pytest.raises(ValueError, match=r'valid must be bool \[N, P\] = \(4, 2\); got int64'):
    negclip.order_sensitivity(x, x, np.ones((4, 2, 3)), np.ones((4, 2), int))
