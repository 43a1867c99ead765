"""Rows → validated examples → tokenized batches.

- `examples`: PreferencePair / TokenizedPair, the one tokenization path, the batch layouts
  (left-padded, shared prompt, packed);
- `chat`: a conversation's tokens as the model reads them at inference, through its chat template;
- `files`: reading rows from local files and the hub;
- `formats`: the datasets' formats (hh, shp, tldr, imdb, ultrafeedback, pairs) and row validation.
"""
from dpo_exp.data.examples import (PADDED, Batch, PairLayout, PreferencePair, TokenizedPair, collate_pairs,
                                   collate_sequences, load_pairs, prompt_token_ids, save_pairs, tokenize_dataset,
                                   tokenize_pair)

__all__ = ["PADDED", "Batch", "PairLayout", "PreferencePair", "TokenizedPair", "collate_pairs", "collate_sequences",
           "load_pairs", "prompt_token_ids", "save_pairs", "tokenize_dataset", "tokenize_pair"]
