"""Corpora, tokenizers, cached token streams and training batches."""

from msrnn.data.batches import PACKINGS, LMBatches, document_rows
from msrnn.data.corpus import DataSpec, Document, load_documents, parse_data_spec, split_of
from msrnn.data.tokenizer import EOS, load_tokenizer, save_tokenizer, train_bpe
from msrnn.data.tokens import TokenStream, cached_token_stream, token_stream, tokenize_documents

__all__ = [
    "EOS",
    "PACKINGS",
    "DataSpec",
    "Document",
    "LMBatches",
    "TokenStream",
    "cached_token_stream",
    "document_rows",
    "load_documents",
    "load_tokenizer",
    "parse_data_spec",
    "save_tokenizer",
    "split_of",
    "token_stream",
    "tokenize_documents",
    "train_bpe",
]
