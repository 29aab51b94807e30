"""Stage 3, read: only the planned samples' byte ranges, counted.

    ranges   merge_ranges (which ranges share a request), ReadCounters
    reader   RangeReader: pread / preadv / O_DIRECT locally, checked range requests for URLs
    remote   HttpRanges: http(s) range reads (206 checked, timeout, retries), RetryPolicy
    errors   ShardError and its kinds (missing, unreachable, no Range support)
    table    EpochTable: an epoch's batches published on disk for reader processes
    source   PlannedSource: (table, batch) -> SourceBatch (payloads + META_DTYPE records)
    sniff    cheap validity checks of encoded images before any decoder sees them
    corrupt  CorruptReport (one warning per shard, max_corrupt_fraction), CorruptSampleError

Imports only pipeline.formats (storage helpers); never a later stage.
"""
