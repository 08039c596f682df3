"""An mp4 of the scripts (--capture-video) as a small looping GIF for the README (run by hand, not collected).

python tests/video_to_gif.py runs/<run>/eval_video.mp4 assets/locomotion_policy.gif [--seconds 6]
"""

import argparse

import imageio.v2 as imageio
import numpy as np
from PIL import Image

parser = argparse.ArgumentParser()
parser.add_argument("video")
parser.add_argument("gif")
parser.add_argument("--seconds", type=float, default=6.0)
parser.add_argument("--width", type=int, default=320)
args = parser.parse_args()

reader = imageio.get_reader(args.video)
fps = reader.get_meta_data()["fps"]
frames = [f for i, f in enumerate(reader) if i < args.seconds * fps][::2]  # every other frame: half the size
height = round(frames[0].shape[0] * args.width / frames[0].shape[1])
images = [
    Image.fromarray(np.asarray(Image.fromarray(f).resize((args.width, height), Image.LANCZOS))).quantize(
        colors=48, method=Image.Quantize.MEDIANCUT
    )
    for f in frames
]
images[0].save(args.gif, save_all=True, append_images=images[1:], duration=round(2000 / fps), loop=0, optimize=True)
print(f"wrote {args.gif}: {len(images)} frames")
