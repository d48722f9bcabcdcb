"""Resumable batch jobs: a task run over many inputs, its results committed to a parquet or JSONL file in
chunks, so that a job killed at any moment is finished by running it again."""

from .runner import CHUNK_SIZE, Job, JobError, Summary, open_job, run_job

__all__ = ["CHUNK_SIZE", "Job", "JobError", "Summary", "open_job", "run_job"]
