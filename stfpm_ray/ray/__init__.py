"""Ray adapters, and only those: the session, the Ray Data scoring pipeline, and Ray Train / Tune around the
core's fit recipe. The only package that imports Ray; the workflows call it for their distributed steps."""
