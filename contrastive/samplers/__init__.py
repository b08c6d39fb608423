"""In-step negative samplers: pure functions (state, embeddings, rng, ...) -> (negatives /
masks / weights, new state), usable with the dense and the blockwise losses.

  queue              MoCo's FIFO memory of past keys (train state, sharded on the data axis)
  momentum           the EMA encoder's update and momentum schedule
  masks              keep-functions: same instance, threshold, GISTEmbed guide, MCL clusters
  mining             top-k hardest negatives (optionally skipping the top-r)
  mochi              MoCHi's synthetic hard negatives per query
  feature_transform  positive extrapolation, negative interpolation, pos/neg histograms
  kmeans             k-means++ and Lloyd's in jnp, sharded (MCL's clusters)
  objective          the InfoNCE objective with all of the above wired from config
"""
