"""Pretraining data: corpus sources (``corpus``), tokenizers (``tokenizer``), packed blocks with
stable example ids (``blocks``), what a pretraining objective provides, block layout included
(``objective``), the masked-LM one (``mlm_masking``) and T5's span corruption
(``span_corruption``), the resumable training order (``sampling``), and the LightningDataModule
that puts them together (``datamodule``)."""
