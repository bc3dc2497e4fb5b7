"""Chained long videos (issue 27, wan22.long_video): on tiny weights a chain is its clips, each from the last frame of
the one before with the next seed, joined once; the end image conditions the last clip only; progress counts every
clip's steps; a cancel stops the chain. On a synthetic chain whose clips drift in colour, matching keeps the last
clip's colours at the first's, where without it the drift adds up."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from wan22 import long_video
from wan22.loader import load_pipeline
from wan22.long_video import colour_stats, frame_image, match_colour
from wan22.pipeline import LoadOptions
from wan22.request.errors import GenerationCancelled, InvalidParameter
from wan22.request.params import GenerationParams
from wan22.testing.drift import last_clip_shift

FP32 = LoadOptions(dtype="fp32", device="cpu")
CLIP = GenerationParams(size="96*64", frame_num=5, sample_steps=2, seed=40, guide_scale=(3.0, 4.0))


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return load_pipeline(tiny_models("upstream"), FP32)


@pytest.fixture(scope="module")
def embeds(pipe):
    return pipe.encode_prompt("a lighthouse in fog", "")


def chained(**fields) -> GenerationParams:
    return GenerationParams(**{**CLIP.__dict__, **fields})


def test_a_chain_is_its_clips_each_from_the_last_frame_before_joined_once(pipe, embeds, test_image):
    steps = []
    got = pipe.generate(test_image, embeds, chained(segments=3, color_match=False),
                        on_step=lambda step, total: steps.append((step, total)))
    assert got.frames.shape == (3 * 4 + 1, 64, 96, 3) and got.seed == 40
    start, want = test_image, []
    for index in range(3):
        clip = pipe.generate(start, embeds, chained(seed=40 + index)).frames
        want.append(clip if index == 0 else clip[1:])
        start = Image.fromarray(clip[-1].numpy())
    assert torch.equal(got.frames, torch.cat(want))
    assert [s["seed"] for s in got.segments] == [40, 41, 42] and [s["frames"] for s in got.segments] == [5, 4, 4]
    assert steps == sorted(steps) and steps[-1] == (6, 6) and {total for _, total in steps} == {6}


def test_the_end_image_conditions_only_the_last_clip(pipe, embeds, test_image):
    end = Image.new("RGB", (96, 64), (30, 200, 60))
    plain = pipe.generate(test_image, embeds, chained(segments=2, color_match=False)).frames
    ended = pipe.generate(test_image, embeds, chained(segments=2, color_match=False), last_image=end).frames
    assert torch.equal(ended[:5], plain[:5])
    last_clip = pipe.generate(frame_image(plain[:5]), embeds, chained(seed=41), last_image=end).frames
    assert torch.equal(ended[5:], last_clip[1:])


def test_one_prompt_per_segment_and_the_count_must_match(pipe, embeds, test_image):
    other = pipe.encode_prompt("a storm over the sea", "")
    both = pipe.encode_prompts("unused", "", "a lighthouse in fog\n\n a storm over the sea ")  # one per line
    assert [torch.equal(e.context, want.context) for e, want in zip(both, (embeds, other))] == [True, True]
    assert pipe.encode_prompts("a lighthouse in fog", "", "").prompt == "a lighthouse in fog"
    two = pipe.generate(test_image, both, chained(segments=2, color_match=False)).frames
    second = pipe.generate(frame_image(two[:5]), other, chained(seed=41)).frames
    assert torch.equal(two[5:], second[1:])
    with pytest.raises(InvalidParameter, match="segment_prompts: has 2 prompts for 3 segments"):
        pipe.generate(test_image, [embeds, other], chained(segments=3))


def test_extending_a_video_by_one_clip_is_the_chain_of_two(pipe, embeds, test_image):
    """What the extend node does: a clip from the video's last frame, matched to its first clip, appended once."""
    first = pipe.generate(test_image, embeds, chained()).frames
    extended = pipe.extend(first, embeds, chained(seed=41))
    assert torch.equal(extended.frames, pipe.generate(test_image, embeds, chained(segments=2)).frames)
    assert extended.frames.shape[0] == 9 and extended.segments[0]["seed"] == 41
    with pytest.raises(InvalidParameter, match="size: the video is 96x64 and 832\\*480 makes 768x512 clips of it"):
        pipe.extend(first, embeds, chained(size="832*480"))
    with pytest.raises(InvalidParameter, match="frame_num: a clip added to a video starts from its last frame: at least 5"):
        pipe.extend(first, embeds, chained(frame_num=1))


def test_a_cancel_in_the_second_clip_stops_the_chain(pipe, embeds, test_image):
    seen = []
    with pytest.raises(GenerationCancelled):
        pipe.generate(test_image, embeds, chained(segments=3), on_step=lambda step, total: seen.append(step),
                      should_cancel=lambda: bool(seen) and seen[-1] >= 3)
    assert max(seen) == 3  # the first clip's two steps, one of the second's, then nothing


@pytest.mark.parametrize("fields, field, why", [
    ({"segments": 9}, "segments", "must be from 1 to 8 (WAN_MAX_SEGMENTS), got 9"),
    ({"segments": 2, "frame_num": 1}, "frame_num", "chained segments need at least 5 frames each"),
    ({"segments": 8, "frame_num": 85}, "segments", "make 673 frames; this server's limit is 641 (WAN_MAX_VIDEO_FRAMES)"),
])
def test_a_chain_over_the_operators_limits_is_refused_naming_the_field(pipe, embeds, test_image, fields, field, why):
    with pytest.raises(InvalidParameter) as exc:
        pipe.generate(test_image, embeds, chained(**fields))
    assert exc.value.field == field and why in exc.value.why


def test_the_operators_segment_limit_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("WAN_MAX_SEGMENTS", "2")
    with pytest.raises(InvalidParameter, match=r"segments: must be from 1 to 2 \(WAN_MAX_SEGMENTS\), got 3"):
        chained(segments=3).validated()
    monkeypatch.setenv("WAN_MAX_VIDEO_FRAMES", "33")
    assert chained(segments=2, frame_num=17).validated().video_frames == 33
    with pytest.raises(InvalidParameter, match="2 segments of 21 frames make 41 frames; this server's limit is 33"):
        chained(segments=2, frame_num=21).validated()


# ----------------------------------------------------------------------------------------------- colours
def test_colour_statistics_are_kornias_cielab_over_every_pixel(monkeypatch):
    """Chunked (3 frames at a time here) as on one tensor; the match moves them to the reference's."""
    from kornia.color import rgb_to_lab

    monkeypatch.setattr(long_video, "CHUNK_FRAMES", 3)
    frames = torch.randint(0, 256, (7, 10, 12, 3), dtype=torch.uint8)
    lab = rgb_to_lab(frames.permute(0, 3, 1, 2).float() / 255).transpose(0, 1).reshape(3, -1).double()
    mean, std = colour_stats(frames)
    assert torch.allclose(mean.double(), lab.mean(1), atol=1e-3) and torch.allclose(std.double(), lab.std(1, unbiased=False), atol=1e-3)
    target = (torch.tensor([55.0, 8.0, -6.0]), torch.tensor([12.0, 9.0, 11.0]))
    moved_mean, moved_std = colour_stats(match_colour(frames, target))
    assert (moved_mean - target[0]).abs().max() < 1.0 and (moved_std - target[1]).abs().max() < 1.0


def test_colour_matching_keeps_the_last_clip_at_the_first_clips_colours():
    """wan22.testing.drift: 6 clips, each warmer and flatter towards its end."""
    without, with_matching = last_clip_shift(False), last_clip_shift(True)
    assert without > 15 and with_matching < 0.2 * without, (without, with_matching)
