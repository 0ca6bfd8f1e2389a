"""Pretraining data: corpus sources (``corpus``), tokenizers (``tokenizer``), packed blocks with
stable example ids (``blocks``), what a pretraining objective provides (``objective``) and the
masked-LM one (``mlm_masking``), the resumable training order (``sampling``), and the
LightningDataModule that puts them together (``datamodule``)."""
