"""`python -m open_clip_train.extract_teacher`: the teacher-cache writer (`distill.extract`; with
`--dataset-type msrvtt` the video teacher's, `video.extract`)."""
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    kind = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--dataset-type"), None)
    kind = kind or next((a.split("=", 1)[1] for a in argv if a.startswith("--dataset-type=")), None)
    if kind == "msrvtt":
        from .video.extract import main as video_main
        return video_main(argv)
    from .distill.extract import main as image_main
    return image_main(argv)


if __name__ == "__main__":
    sys.exit(main())
