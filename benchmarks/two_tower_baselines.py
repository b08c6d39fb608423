"""Non-learned baselines of the two-tower recipes on their held-out splits (the same items and
links as contrastive/two_tower_eval.py): TF-IDF cosine retrieval for text-text pairs (WordNet
word <-> gloss), and chance for retrieval and zero-shot. One JSON line per dataset:

  python benchmarks/two_tower_baselines.py --datasets=wordnet_gloss,emoji_cldr \\
      >> benchmarks/results/two_tower_baselines.jsonl

TF-IDF: character 3-grams of the lower-cased text (words share few whole tokens with their
glosses, but often stems), weights tf * log(N / df) over the union of both sides' items,
L2-normalised; recall@k as in the evaluator (a hit is any top-k item linked to the query).
Chance recall@k of a query with m links among M keys is 1 - C(M - m, k) / C(M, k).
"""

import argparse
import collections
import json
import math

import ml_collections
import numpy as np

from contrastive.data import pair_batches

KS = (1, 5, 10)


def char_ngrams(text, n=3):
  text = f' {text.lower()} '
  return [text[i:i + n] for i in range(len(text) - n + 1)]


def tfidf(texts_a, texts_b):
  """L2-normalised TF-IDF rows [Na, V], [Nb, V] (dense float32) over a shared vocabulary."""
  grams = [collections.Counter(char_ngrams(t)) for t in list(texts_a) + list(texts_b)]
  df = collections.Counter(g for c in grams for g in c)
  vocab = {g: i for i, g in enumerate(sorted(df))}
  idf = np.array([math.log(len(grams) / df[g]) for g in sorted(df)], np.float32)
  rows = np.zeros((len(grams), len(vocab)), np.float32)
  for r, c in enumerate(grams):
    for g, count in c.items():
      rows[r, vocab[g]] = count * idf[vocab[g]]
  rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
  return rows[:len(texts_a)], rows[len(texts_a):]


def recall(queries, keys, links, ks=KS, chunk=512):
  """{'r@k'}: share of queries with a linked key among their top k (exact, chunked)."""
  linked = collections.defaultdict(set)
  for q, k in links:
    linked[int(q)].add(int(k))
  hits = np.zeros((queries.shape[0], len(ks)), bool)
  for start in range(0, queries.shape[0], chunk):
    scores = queries[start:start + chunk] @ keys.T
    top = np.argsort(-scores, axis=1, kind='stable')[:, :max(ks)]
    for i, row in enumerate(top):
      good = [j in linked[start + i] for j in row]
      hits[start + i] = [any(good[:k]) for k in ks]
  return {f'r@{k}': float(v) for k, v in zip(ks, hits.mean(0))}


def chance_recall(links, num_keys, num_queries, ks=KS):
  per_query = collections.Counter(int(q) for q, _ in links)
  return {f'r@{k}': float(np.mean([1 - math.comb(num_keys - per_query[q], k) /
                                   math.comb(num_keys, k) for q in range(num_queries)]))
          for k in ks}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--datasets', default='wordnet_gloss,emoji_cldr')
  parser.add_argument('--data_dir', default='')
  args = parser.parse_args(argv)
  for name in args.datasets.split(','):
    cfg = ml_collections.ConfigDict(dict(name=name, data_dir=args.data_dir, image_size=32,
                                         languages=('en',), max_examples=0, examples=True))
    source = pair_batches.get_source(cfg, 'test')
    spec = pair_batches.spec(cfg, source)
    ev = pair_batches.eval_pairs(source, spec)
    links = ev['pairs']
    na, nb = len(ev['a_items']), len(ev['b_items'])
    row = dict(dataset=name, num_a=na, num_b=nb, num_links=int(len(links)))
    row.update({f'chance/a2b/{k}': v for k, v in chance_recall(links, nb, na).items()})
    row.update({f'chance/b2a/{k}': v for k, v in chance_recall(links[:, ::-1], na, nb).items()})
    if not spec.a_is_image:
      a, b = tfidf(ev['a_items'], ev['b_items'])
      row.update({f'tfidf/a2b/{k}': v for k, v in recall(a, b, links).items()})
      row.update({f'tfidf/b2a/{k}': v for k, v in recall(b, a, links[:, ::-1]).items()})
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
