"""The data layer: rows -> Conversation (formats) -> token ids + labels (render) -> batches (packing).

files reads local data files, sources turns a dataset spec into validated conversations (local,
hub or built-in), loading.build_datasets turns --dataset/--val_dataset into rendered samples with a
report per dataset; check.main is `lorakit check-data` on sft rows
(lorakit/check_data.py picks it or the preference report).
"""
