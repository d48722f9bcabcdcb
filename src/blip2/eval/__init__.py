"""Evaluation: caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D as the COCO caption evaluation), VQA accuracy
(the official normalisation and 10-annotator rule) and image-text retrieval recall (ITC, ITC + ITM re-rank).

The metrics are pure functions (`captions`, `vqa`, `retrieval`); `datasets` reads annotation and result
files as hostile input; `run` puts them together for `blip2 eval`. Nothing heavy is imported here.
"""
