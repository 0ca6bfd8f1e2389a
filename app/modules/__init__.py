"""LightningModules: the budgeted base every pretraining module shares (``budgeted``), masked-LM
pretraining (``masked_lm``), T5 span-corruption pretraining (``span_corruption``), and downstream
fine-tuning: encoders with task heads (``finetuner``), T5 text-to-text (``text_to_text``)."""
