"""LightningModules: the budgeted base every pretraining module shares (``budgeted``), with the
strategy checks it runs at setup (``strategies``), masked-LM pretraining (``masked_lm``), T5
span-corruption pretraining (``span_corruption``), the per-example loss math both share
(``losses``), and downstream fine-tuning: encoders with task heads (``finetuner``), T5
text-to-text (``text_to_text``)."""
