"""Pretraining data: corpus sources (``corpus``), tokenizers (``tokenizer``), packed blocks with
stable example ids (``blocks``), the objectives that turn blocks into training examples
(``mlm_masking``), and the LightningDataModule that puts them together (``datamodule``)."""
