"""Fixtures shared by the experiments tests: a tiny BPE tokenizer trained offline."""

import pytest

from tests.experiments import tiny_bpe


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory):
  """A directory with a 384-token byte-level BPE's tokenizer.json and tokenizer_config.json
  (BOS <s> added, EOS </s>, mask <mask>), trained on a few standard-library files."""
  return tiny_bpe.train_bpe(tmp_path_factory.mktemp("bpe"))
