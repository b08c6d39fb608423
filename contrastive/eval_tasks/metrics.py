"""Zero-shot classification and retrieval metrics as CLIP_benchmark names and computes them.

Zero-shot (Radford et al. 2021, section 3.1): class c's embedding is the normalised mean of its
normalised template embeddings (`retrieval.class_embeddings`); an image's scores are its cosine
to each class. Over N images with labels y and top-k sets T_k(i):

    acc1 = 1/N sum_i [y_i = argmax_c s_ic]        acc5 = 1/N sum_i [y_i in T_5(i)]
    mean_per_class_recall = 1/|C'| sum_{c in C'} (1/N_c) sum_{i: y_i = c} [y_i = argmax s_i]

C' the classes present among the labels (CLIP_benchmark: sklearn's balanced accuracy); acc5 is
None with fewer than 5 classes (CLIP_benchmark: NaN). Equal scores: the lower class index
first. `ZeroShot` accumulates these over batches, so a dataset
of any size streams through it.

Retrieval, images with several captions each (CLIP_benchmark's `zeroshot_retrieval`):

    image_retrieval_recall@k = share of captions whose image is among their k nearest images
    text_retrieval_recall@k  = share of images with one of their captions among their k
                               nearest captions
"""

import numpy as np

from contrastive import retrieval


class ZeroShot:
  """Streaming zero-shot accuracy against class embeddings [C, D] (L2-normalised)."""

  def __init__(self, class_emb, *, block_size=1024):
    self.class_emb, self.block_size = np.asarray(class_emb), block_size
    num = len(self.class_emb)
    self.k = min(5, num)
    self.correct1, self.correct5, self.count = 0, 0, 0
    self.per_class = np.zeros((2, num), np.int64)  # (hits, images) per class

  def add(self, image_emb, labels):
    """image_emb [n, D] L2-normalised, labels [n] int."""
    _, top = retrieval.topk_retrieval(image_emb, self.class_emb, k=self.k,
                                      block_size=self.block_size)
    top, labels = np.asarray(top), np.asarray(labels)
    hit1 = top[:, 0] == labels
    self.correct1 += int(hit1.sum())
    self.correct5 += int((top == labels[:, None]).any(1).sum())
    self.count += len(labels)
    np.add.at(self.per_class[0], labels, hit1.astype(np.int64))
    np.add.at(self.per_class[1], labels, 1)

  def result(self):
    present = self.per_class[1] > 0
    recall = self.per_class[0][present] / self.per_class[1][present]
    n = max(self.count, 1)
    return {'acc1': self.correct1 / n,
            'acc5': self.correct5 / n if len(self.class_emb) >= 5 else None,
            'mean_per_class_recall': float(recall.mean()) if present.any() else 0.0}


def retrieval_recalls(image_emb, text_emb, text_image, ks=(1, 5, 10), *, block_size=1024):
  """CLIP_benchmark's recalls (module docstring).

  Args:
    image_emb: [N, D] and text_emb: [M, D], L2-normalised.
    text_image: [M] int, the image of each caption.
    ks: the k's, each clipped to the number of keys.

  Returns:
    {'image_retrieval_recall@k', 'text_retrieval_recall@k'} for every k.
  """
  text_image = np.asarray(text_image)
  n, m = len(image_emb), len(text_emb)
  kmax_i, kmax_t = min(max(ks), n), min(max(ks), m)
  _, t2i = retrieval.topk_retrieval(text_emb, image_emb, k=kmax_i, block_size=block_size)
  _, i2t = retrieval.topk_retrieval(image_emb, text_emb, k=kmax_t, block_size=block_size)
  t2i, i2t = np.asarray(t2i), np.asarray(i2t)
  image_hit = t2i == text_image[:, None]  # [M, k]: caption's own image at rank r
  text_hit = text_image[i2t] == np.arange(n)[:, None]  # [N, k]: one of the image's captions
  out = {}
  for k in ks:
    out[f'image_retrieval_recall@{k}'] = float(image_hit[:, :k].any(1).mean())
    out[f'text_retrieval_recall@{k}'] = float(text_hit[:, :k].any(1).mean())
  return out
