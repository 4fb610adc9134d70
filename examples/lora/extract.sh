#!/bin/sh
# Turn a full fine-tune back into a peft LoRA adapter (rank 64 at most), saving the embeddings and
# lm_head whole (mergekit-extract-lora's default); report the energy each rank keeps. See docs/lora.md.
dppa-stream extract-lora ./models/ft1 ./models/base ./adapters/ft1-lora \
    --rank 64 --memory-limit 4GiB --json ./adapters/ft1-lora-energy.json --plot ./adapters/ft1-lora-energy.png
