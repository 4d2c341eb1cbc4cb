"""The shipped pipelines, one file per algorithm (importable as ``rlflow.pipelines``)."""
