"""Data hygiene tools (as WeChat runs them), each writing a reviewable report:

- ``dupes``: exact (MD5) and near (dHash, multi-index hashing + union-find) duplicate groups of a catalog;
- ``denoise``: per SKU, the largest tight DBSCAN cluster of its images' embeddings, noise points close to it
  won back, the rest proposed for removal;
- ``merge``: SKU pairs a classifier confuses (p_ij = c_ij / n_i above a threshold) proposed for merging.

Run ``python -m offline.hygiene {dupes,denoise,merge} --help``.
"""
