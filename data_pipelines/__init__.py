"""Apache Beam pipelines that turn raw medical text into training data (the recipe's first pillar).

They sit above medjax's lower layers (tasks/ for the decontamination tokenisation, data/ for the
tokenizer) and below training: their output (ArrayRecord token shards, clean JSONL) is what
`medjax train` and RAG read. Beam is an optional install (`medjax[data]`).
"""
