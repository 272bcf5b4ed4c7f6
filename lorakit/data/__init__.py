"""The data layer: rows -> Conversation (formats) -> token ids + labels (render) -> batches (packing).

loading.build_datasets turns --dataset/--val_dataset into rendered samples with a report per
dataset; check.main is `lorakit check-data`.
"""
