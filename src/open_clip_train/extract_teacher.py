"""`python -m open_clip_train.extract_teacher`: the teacher-cache writer (`distill.extract`)."""
import sys

from .distill.extract import main

if __name__ == "__main__":
    sys.exit(main())
