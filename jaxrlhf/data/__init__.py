"""Data pipeline: sources, schemas, tokenization with exact masks, batching and iteration.

Typical use (``config.data`` as in docs/data.md)::

    tok = data.load_tokenizer(config.tokenizer)
    train_ds, eval_ds = data.build_datasets(config.data, tok, "preference")
    it = data.BatchIterator(train_ds, config.batch_size)   # seed/shuffle/bucket/packing from config.data
    batch = next(it)            # this process's rows of the global batch, dict of numpy arrays
    state = it.get_state()      # store in the checkpoint; it.set_state(state) resumes
"""

from jaxrlhf.data.iterator import BatchIterator, pack_first_fit
from jaxrlhf.data.schemas import ALL_SCHEMAS, SchemaError, detect_schema, split_hh
from jaxrlhf.data.sources import (
    DATA_CONFIG_KEYS,
    DATA_DEFAULTS,
    check_data_config,
    default_data_config,
    has_eval,
    load_rows,
    load_tokenizer,
)
from jaxrlhf.data.tokenize import (
    DROP_REASONS,
    EDIT_REASONS,
    DataError,
    DropStats,
    PreferenceDataset,
    PromptDataset,
    SFTDataset,
    TokenizedDataset,
    build_dataset,
    build_datasets,
    start_ids,
    tokenize_rows,
)

__all__ = [
    "ALL_SCHEMAS",
    "DATA_CONFIG_KEYS",
    "DATA_DEFAULTS",
    "DROP_REASONS",
    "EDIT_REASONS",
    "BatchIterator",
    "DataError",
    "DropStats",
    "PreferenceDataset",
    "PromptDataset",
    "SFTDataset",
    "SchemaError",
    "TokenizedDataset",
    "build_dataset",
    "build_datasets",
    "check_data_config",
    "default_data_config",
    "detect_schema",
    "has_eval",
    "load_rows",
    "load_tokenizer",
    "pack_first_fit",
    "split_hh",
    "start_ids",
    "tokenize_rows",
]
