"""Teacher-target store: the teacher's logits, written once by ``precompute``, read by ``distill``.

Layout
------
A store is a master file ``targets.h5`` plus shard files beside it
(``targets-00000-of-00004.h5`` ...). Every shard holds a contiguous range of rows; the master
joins them with HDF5 virtual datasets whose source file names are *relative* (bare file names in
the master's folder), so h5py/h5dump see one table and the folder can be moved as a whole.

Per row (schema version 2): ``logits`` (N, C) in dense mode, or ``topk_logits`` (N, K),
``topk_index`` (N, K) and ``logsumexp`` (N,) in top-k mode; plus ``id``, ``label`` (-1 = none)
and ``split`` (uint8 code into ``SPLIT_NAMES``). These tables hold view 0, the teacher on the clean input.
A store of V > 1 views (``precompute --views V``; attribute ``views``) also holds views 1..V-1, the teacher
on augmented inputs, in the same tables with a ``view_`` prefix and a view axis: ``view_logits``
(N, V-1, C), or ``view_topk_logits``/``view_topk_index`` (N, V-1, K) and ``view_logsumexp`` (N, V-1). The
attribute ``view_policy`` (JSON) records how to rebuild each view's input (:mod:`reducedmpl.data.views`).
Version 1 (no views) is still read, as a one-view store. Logits are stored raw (not divided by the
temperature, not converted to probabilities: float16 probabilities underflow); the temperature is
metadata that the reader applies. ``logsumexp`` is over all C raw logits, so top-k probabilities
are exact at temperature 1 and the remainder mass ``1 - sum(p_topk)`` is known. The reader spreads
that mass evenly over the other C-K classes; at a temperature other than 1 the top-k classes keep
their exact relative odds but the remainder is approximated (as C-K equal logits).

Storage choices
---------------
* Logits are chunked (chunks of roughly 256 KiB, within 64 KiB-1 MiB unless the whole shard is
  smaller) and **not compressed**: training reads rows in random order, and a compressed chunk must be decompressed
  whole to get one row of it (measured: ~130 rows/s compressed vs 4.7k-12k rows/s uncompressed);
  float logits also compress poorly.
* ``id``/``label``/``split`` are small, read whole once at open, and compress well, so they use
  gzip+shuffle (gzip rather than lzf because every HDF5 tool, h5dump included, can decode it).
* Files are written under a temporary name (``.NAME.tmp``), fsynced and renamed, and carry
  ``complete=True`` only once fully written, so an interrupted run never leaves a file that
  looks finished.

Reading
-------
Reading rows one at a time in random order is slow, so :class:`TargetStore` never does it. If the
table fits ``memory_budget_bytes`` it is loaded once and batches are gathered by fancy indexing
(``in_memory=True``; top-k makes ImageNet-scale tables ~50 MB). Otherwise (out-of-core) the rows a
batch needs are sorted and de-duplicated, rows separated by a small gap are merged into contiguous
blocks, each block is fetched with one slice read, and the result is un-sorted to the caller's
order (for random ids over a large table most blocks are single rows, but they are read in file
order and never twice). For a store of several views a row's augmented view comes off the disk alone: the rows
that chose view v are read as ``[start:stop, v]`` selections of the view_* tables, which are chunked one view at a
time. The file is opened with HDF5's chunk cache disabled (``rdcc_nbytes=0``, which also applies
to the shards behind the virtual datasets): uncompressed chunks are then read only where selected
instead of whole into the cache. Measured on a 2-core machine with a page-cached 200k x 1000
float16 table, reading random 256-row batches ran at ~90k-130k rows/s this way, versus ~15k-20k
rows/s with the default cache and ~7k rows/s with one union-of-hyperslabs read per batch.
"""
from .folder import StoreLock, prepare_store, read_run_key, store_files, stored_predictions
from .meta import (DENSE_FIELDS, LOGIT_DTYPES, MASTER_NAME, ROW_FIELDS, SCHEMA_VERSION, SPLIT_NAMES,
                   SUPPORTED_SCHEMA_VERSIONS, TOPK_FIELDS, StoreMeta, check_class_names, class_names_problem,
                   derive_run_key, file_sha256)
from .reader import TargetStore
from .verify import verify_store
from .writer import ShardWriter, plan_shards, shard_is_complete, shard_paths, target_bytes_per_row, write_master

__all__ = ["DENSE_FIELDS", "LOGIT_DTYPES", "MASTER_NAME", "ROW_FIELDS", "SCHEMA_VERSION", "SPLIT_NAMES",
           "SUPPORTED_SCHEMA_VERSIONS", "TOPK_FIELDS", "ShardWriter", "StoreLock", "check_class_names",
           "class_names_problem", "StoreMeta", "TargetStore", "derive_run_key",
           "file_sha256", "plan_shards", "prepare_store", "read_run_key", "shard_is_complete", "shard_paths",
           "store_files", "stored_predictions", "target_bytes_per_row", "verify_store", "write_master"]
