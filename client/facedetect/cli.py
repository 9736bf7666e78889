"""`facedetect`: the API from a shell. Reads FACEDETECT_URL and FACEDETECT_API_KEY.

Exit status: 0 done, 1 the service or a file said no (or the image failed), 2 bad usage,
3 gave up waiting, 130 interrupted.
"""

import argparse
import json
import os
import sys

from .api import ApiError, Client, FaceDetectError

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_ERROR, EXIT_USAGE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 3, 130


class CommandFailed(Exception):
    """A readable reason to stop with a non-zero status."""

    def __init__(self, message, status=EXIT_ERROR):
        super().__init__(message)
        self.status = status


def main(argv=None):
    """Entry point of the `facedetect` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        api_key = os.environ.get("FACEDETECT_API_KEY", "").strip()
        if not api_key:
            raise CommandFailed("set FACEDETECT_API_KEY to your API key (manage.py create_client prints one)",
                                EXIT_USAGE)
        with Client(args.url, api_key, timeout=args.request_timeout) as client:
            args.run(client, args)
        return 0
    except CommandFailed as failure:
        return _fail(str(failure), failure.status)
    except ApiError as error:
        details = f"\n  details: {json.dumps(error.details, sort_keys=True)}" if error.details else ""
        return _fail(f"{error.message} ({error.status} {error.code}){details}")
    except FaceDetectError as error:
        return _fail(str(error))
    except TimeoutError as error:
        return _fail(str(error), EXIT_TIMEOUT)
    except BrokenPipeError:  # `facedetect list | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as error:  # a photo that cannot be read, an output that cannot be written
        return _fail(f"{error.strerror or error}: {error.filename}" if error.filename else str(error))
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)


def _fail(message, status=EXIT_ERROR):
    print(f"facedetect: error: {message}", file=sys.stderr)
    return status


# --- commands ---

def submit(client, args):
    image = client.submit(args.photo, request_id=args.request_id, callback_url=args.callback_url,
                          min_face_size=args.min_face_size, min_confidence=args.min_confidence,
                          annotation=args.annotation, engine=args.engine)
    if args.wait or args.out:
        _note(f"submitted {image['id']} ({image['status']}); waiting up to {args.timeout:g} s")
        image = client.wait(image["id"], timeout=args.timeout)
    _print_json(image)
    if image["status"] == "failed":
        error = image.get("error") or {}
        raise CommandFailed(f"image {image['id']} failed: {error.get('message', 'no reason given')} "
                            f"({error.get('code', 'unknown')})")
    if args.out:
        path = client.download(image["id"], args.out)
        _note(f"{image['face_count']} face(s); annotated image written to {path}")


def list_images(client, args):
    body = client.list(status=args.status, request_id=args.request_id, page=args.page)
    if args.json:
        _print_json(body)
        return
    rows = [(image["id"], image["status"], _blank(image.get("face_count")), _blank(image.get("request_id")),
             image.get("created_at") or "") for image in body["results"]]
    _print_table(("ID", "STATUS", "FACES", "REQUEST ID", "CREATED"), rows)
    page = args.page or 1
    more = f"; next: --page {page + 1}" if body.get("next") else ""
    print(f"{len(rows)} of {body['count']} image(s), page {page}{more}")


def get(client, args):
    _print_json(client.get(args.id))


def download(client, args):
    path = client.download(args.id, args.out, which=args.which)
    _note(f"{args.which} image written to {path} ({path.stat().st_size} bytes)")


def delete(client, args):
    client.delete(args.id)
    _note(f"deleted {args.id}")


# --- plumbing ---

def _parser():
    parser = argparse.ArgumentParser(
        prog="facedetect", description="Find faces in photos with the face detection API.",
        epilog=f"Environment: FACEDETECT_URL (default {DEFAULT_URL}), FACEDETECT_API_KEY.")
    parser.add_argument("--url", default=os.environ.get("FACEDETECT_URL") or DEFAULT_URL,
                        help="the API's base URL (default: $FACEDETECT_URL or %(default)s)")
    parser.add_argument("--request-timeout", type=_positive, default=30, metavar="SECONDS",
                        help="limit for each HTTP request (default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("submit", help="upload a photo")
    p.add_argument("photo", help="JPEG, PNG, WebP or BMP file")
    p.add_argument("--request-id", help="your idempotency key (at most 128 characters)")
    p.add_argument("--callback-url", help="http(s) URL that receives the signed result")
    p.add_argument("--annotation", choices=("boxes", "blur", "pixelate"))
    p.add_argument("--engine", choices=("mtcnn", "blazeface"),
                   help="the detector (server default: mtcnn); blazeface is several times faster")
    p.add_argument("--min-face-size", type=int, metavar="PIXELS")
    p.add_argument("--min-confidence", type=float, metavar="0..1")
    p.add_argument("--wait", action="store_true", help="wait until the image is done or failed")
    p.add_argument("--timeout", type=_positive, default=120, metavar="SECONDS",
                   help="how long --wait waits (default %(default)s)")
    p.add_argument("--out", metavar="FILE", help="save the annotated image here (implies --wait)")
    p.set_defaults(run=submit)

    p = commands.add_parser("list", help="list your images, newest first")
    p.add_argument("--status", choices=("queued", "processing", "done", "failed"))
    p.add_argument("--request-id")
    p.add_argument("--page", type=int, metavar="N")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    p.set_defaults(run=list_images)

    p = commands.add_parser("get", help="show one image as JSON")
    p.add_argument("id")
    p.set_defaults(run=get)

    p = commands.add_parser("download", help="save the annotated (or original) image")
    p.add_argument("id")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--original", dest="which", action="store_const", const="original", default="annotated",
                   help="the uploaded photo instead of the annotated one")
    p.set_defaults(run=download)

    p = commands.add_parser("delete", help="delete an image and its files")
    p.add_argument("id")
    p.set_defaults(run=delete)
    return parser


def _positive(value):
    try:
        number = float(value)
    except ValueError:
        number = 0
    if not number > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return number


def _print_json(value):
    print(json.dumps(value, indent=2))


def _note(message):
    print(message, file=sys.stderr)


def _blank(value):
    return "-" if value is None else str(value)


def _print_table(header, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
