"""The task API: the engine (a loaded checkpoint that encodes images and generates), captioning and
questions, matching and embeddings, and the batch iterator the front ends share. `api.Blip2` is the object
`blip2.load` returns: the engine with the tasks as methods."""
