"""LightningModules: the budgeted base every pretraining module shares (``budgeted``), masked-LM
pretraining (``masked_lm``) and downstream fine-tuning (``finetuner``)."""
