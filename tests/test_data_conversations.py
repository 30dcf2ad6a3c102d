"""Conversations for SFT: every file format and source, oasst trees, detection, errors, and the
built-in corpora (sharegpt's truncated file, chatterbot, reasoning-gym with its scorers)."""
from __future__ import annotations

import json
import os

import pytest

from lmforge.data.chat_corpora import (iter_json_list, load_chatterbot, load_sharegpt, reasoning_gym_conversations,
                                       score_answer)
from lmforge.data.conversations import FORMATS, check_messages, detect_format, read_conversations, to_conversation
from lmforge.errors import UserError


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def tool(text):
    return {"role": "tool", "content": text}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats and sources

def test_alpaca_jsonl_keeps_system_and_appends_input(tmp_path):
    file = write_jsonl(tmp_path / "data.jsonl", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "Be brief."},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ])
    convs = read_conversations(file)
    assert [c.messages for c in convs] == [
        [system("Be brief."), user("Add the numbers.\n\n2 and 3"), assistant("5")],
        [user("Say hi."), assistant("Hi!")],
    ]
    assert [c.source for c in convs] == [f"{file}:1", f"{file}:2"]
    assert len(read_conversations(file, limit=1)) == 1


def test_dolly_json_list_appends_context(tmp_path):
    file = tmp_path / "dolly.json"
    file.write_text(json.dumps([{"instruction": "Who wrote it?", "context": "Hamlet is a play by Shakespeare.",
                                 "response": "Shakespeare.", "category": "closed_qa"},
                                {"instruction": "Name a colour.", "context": "", "response": "Blue."}]))
    convs = read_conversations(file)
    assert convs[0].messages == [user("Who wrote it?\n\nHamlet is a play by Shakespeare."), assistant("Shakespeare.")]
    assert convs[1].messages == [user("Name a colour."), assistant("Blue.")]
    assert convs[1].source == f"{file}[1]"


def test_sharegpt_parquet_keeps_multi_turn_system_and_tool_turns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"system": "You can call tools.", "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "It is 21 C."},
            {"from": "human", "value": "Thanks!"},
            {"from": "chatgpt", "value": "You're welcome."}]},
        {"system": None, "conversations": [{"from": "user", "value": "Hi"}, {"from": "bard", "value": "Hello"}]},
    ]
    file = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist(rows), file)
    convs = read_conversations(file)
    assert convs[0].messages == [
        system("You can call tools."), user("Weather in Paris?"),
        assistant('{"name": "weather", "arguments": {"city": "Paris"}}'), tool('{"temp": 21}'),
        assistant("It is 21 C."), user("Thanks!"), assistant("You're welcome.")]
    assert convs[1].messages == [user("Hi"), assistant("Hello")]
    assert [c.source for c in convs] == [f"{file}[0]", f"{file}[1]"]


def test_openai_messages_in_a_data_wrapper_with_parts_developer_and_tool_calls(tmp_path):
    calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]
    record = {"messages": [
        {"role": "developer", "content": "Use tools for maths."},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+3?"}]},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "content": "5", "tool_call_id": "c1"},
        {"role": "assistant", "content": "2+3 = 5."},
        {"role": "user", "content": "And 5+5?"},
        {"role": "assistant", "content": "10."}]}
    file = tmp_path / "chat.json"
    file.write_text(json.dumps({"data": [record]}))
    (conv,) = read_conversations(file)
    assert conv.messages == [system("Use tools for maths."), user("What is 2+3?"), assistant(json.dumps(calls)),
                             tool("5"), assistant("2+3 = 5."), user("And 5+5?"), assistant("10.")]
    assert conv.source == f"{file}['data'][0]"
    single = tmp_path / "one.json"  # a .json file holding one record
    single.write_text(json.dumps(record))
    assert read_conversations(single)[0].messages == conv.messages


def test_prompt_completion_from_a_datasets_directory_and_trl_conversational_jsonl(tmp_path):
    import datasets

    rows = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "Capital of France?", "completion": "Paris"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "pc"))
    convs = read_conversations(tmp_path / "pc")  # a DatasetDict reads its train split
    assert [c.messages for c in convs] == [[user("2+2="), assistant("4")],
                                           [user("Capital of France?"), assistant("Paris")]]
    assert convs[1].source == "pc[1]"
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert len(read_conversations(tmp_path / "single")) == 2

    file = write_jsonl(tmp_path / "trl.jsonl", [{
        "prompt": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
        "completion": [{"role": "assistant", "content": "Bonjour"}]}])
    assert read_conversations(file)[0].messages == [system("Answer in French."), user("Hello"), assistant("Bonjour")]


def test_a_cached_hf_dataset_by_name_and_a_miss(tmp_path, monkeypatch):
    import datasets
    from datasets.packaged_modules.json.json import Json

    # Put a dataset in an offline cache the way `load_dataset("tiny_chats")` would have left it.
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    source = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "Ping", "output": "Pong"}])
    builder = Json(data_files={"train": str(source)}, dataset_name="tiny_chats", config_name="default",
                   hash="0123abcd", cache_dir=str(cache))
    builder.download_and_prepare()
    built = next((cache / "tiny_chats").glob("default-*"))
    built.rename(built.with_name("default"))
    monkeypatch.chdir(tmp_path)
    (conv,) = read_conversations("tiny_chats")
    assert conv.messages == [user("Ping"), assistant("Pong")] and conv.source == "tiny_chats[0]"
    with pytest.raises(UserError, match=r"'no_such_chats' is not a file, a directory, a built-in \(sharegpt, "
                                        r"chatterbot, reasoning-gym:TASK.*\) or a dataset in the local"):
        read_conversations("no_such_chats")


# ---------------------------------------------------------------- OpenAssistant trees

def oasst_row(message_id, parent_id, role, text, rank=None, deleted=False):
    return {"message_id": message_id, "parent_id": parent_id, "role": role, "text": text, "rank": rank,
            "deleted": deleted, "lang": "en"}


def test_oasst_rows_become_every_root_to_leaf_thread_best_rank_first(tmp_path):
    rows = [
        oasst_row("p1", None, "prompter", "What is 2+2?"),
        oasst_row("a1", "p1", "assistant", "4, because 2+2=4.", rank=1),
        oasst_row("a2", "p1", "assistant", "4", rank=0),
        oasst_row("a5", "p1", "assistant", "spam", rank=2, deleted=True),
        oasst_row("p3", "a5", "prompter", "orphaned by the deletion"),
        oasst_row("p2", "a1", "prompter", "And 3+3?"),
        oasst_row("a3", "p2", "assistant", "6", rank=0),
        oasst_row("a4", "p2", "assistant", "Six.", rank=1),
        oasst_row("p4", "a2", "prompter", "Thanks"),  # an unanswered leaf: cut back to a2
        oasst_row("q1", None, "prompter", "Hi"),
        oasst_row("b1", "q1", "assistant", "Hello!"),
        oasst_row("b2", "q1", "assistant", "Hello!"),  # the same thread twice: kept once
    ]
    file = write_jsonl(tmp_path / "oasst.jsonl", rows)
    threads = read_conversations(file)
    q1, a1, p2 = user("What is 2+2?"), assistant("4, because 2+2=4."), user("And 3+3?")
    assert [t.messages for t in threads] == [
        [q1, assistant("4")],
        [q1, a1, p2, assistant("6")],
        [q1, a1, p2, assistant("Six.")],
        [user("Hi"), assistant("Hello!")],
    ]
    assert [t.source for t in threads] == [f"{file}:1#0", f"{file}:1#1", f"{file}:1#2", f"{file}:10#0"]
    assert threads[1].meta == {"message_ids": ["p1", "a1", "p2", "a3"], "lang": "en"}
    assert [t.messages for t in read_conversations(file, format="oasst", limit=2)] == [t.messages for t in threads[:2]]
    with pytest.raises(UserError, match=r"oasst\.jsonl:2: 'role' is 'bot', but an oasst record needs 'message_id'"):
        read_conversations(write_jsonl(file, [rows[0], oasst_row("x", "p1", "bot", "?")]), format="oasst")


# ---------------------------------------------------------------- detection, forcing, checks

def test_auto_detection_from_keys_and_a_forced_format(tmp_path):
    assert detect_format({"instruction": "", "input": "", "output": ""}) == "alpaca"
    assert detect_format({"instruction": "", "context": "", "response": ""}) == "dolly"
    assert detect_format({"conversations": []}) == detect_format({"items": []}) == "sharegpt"
    assert detect_format({"messages": []}) == "messages"
    assert detect_format(oasst_row("m", None, "prompter", "x")) == "oasst"
    assert detect_format({"prompt": "", "completion": ""}) == "prompt_completion"
    with pytest.raises(UserError, match=r"cannot tell the conversation format from the keys \(found: body, title\)"):
        detect_format({"title": "", "body": ""})

    # Both shapes in one record: auto picks "messages", format= picks the other.
    record = {"messages": [user("from messages"), assistant("m")], "prompt": "from prompt", "completion": "p"}
    file = write_jsonl(tmp_path / "both.jsonl", [record])
    assert read_conversations(file)[0].messages[0] == user("from messages")
    assert read_conversations(file, format="prompt_completion")[0].messages == [user("from prompt"), assistant("p")]
    assert to_conversation(record, "auto", "here").source == "here"
    with pytest.raises(UserError, match=r"both\.jsonl:1: 'instruction' is missing .*an alpaca record needs"):
        read_conversations(file, format="alpaca")
    assert set(FORMATS) == {"auto", "alpaca", "dolly", "sharegpt", "messages", "oasst", "prompt_completion"}


def test_malformed_json_line_and_missing_fields_name_the_file_line_and_fields(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"data\.jsonl:3: the line is not valid JSON .*fix or delete that line"):
        read_conversations(file)
    write_jsonl(file, [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e"}])
    with pytest.raises(UserError, match=r"data\.jsonl:3: 'output' is missing \(keys: instruction\), but an alpaca "
                                        r"record needs 'instruction' and 'output' \(strings.*"
                                        r"fix that line or pass format="):
        read_conversations(file)
    listed = tmp_path / "data.json"
    listed.write_text(json.dumps([{"messages": [user("q"), assistant("a")]}, {"messages": [{"role": "bot"}]}]))
    with pytest.raises(UserError, match=r"data\.json\[1\]: message 1 has role='bot' .*a messages record needs "
                                        r"'messages': a list of \{'role', 'content'\}.*fix that record"):
        read_conversations(listed)
    listed.write_text('[{"messages": []},\n {"oops"}]')
    with pytest.raises(UserError, match=r"data\.json' is not valid JSON \(.* at line 2 column"):
        read_conversations(listed)


@pytest.mark.parametrize("messages, problem", [
    ([assistant("hi")], "turn 1 is an assistant turn with no user or tool turn"),
    ([user("a"), assistant("b"), system("late"), user("c"), assistant("d")], "turn 3 is a system turn"),
    ([user("a"), tool("42"), assistant("b")], "turn 2 is a tool turn that does not follow an assistant turn"),
    ([user("a"), assistant("  ")], "the conversation has no assistant turn with text"),
    ([user("a"), assistant("b"), assistant("c")], "turn 3 is an assistant turn"),
])
def test_turn_order_is_checked(tmp_path, messages, problem):
    assert problem in check_messages(messages)
    file = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [user("fine"), assistant("ok")]}, {"messages": messages}])
    with pytest.raises(UserError, match=rf"bad\.jsonl:2: {problem}.*; fix that line"):
        read_conversations(file)


def test_bad_paths_formats_and_names(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl' does not exist; check the path \(built-in corpora: sharegpt"):
        read_conversations(str(tmp_path / "nope.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"unknown extension '\.csv'; conversations are read from \.json, \.jsonl"):
        read_conversations(tmp_path / "data.csv")
    with pytest.raises(UserError, match=r"unknown conversation format 'chatml'; choose one of: auto, alpaca, dolly"):
        read_conversations(tmp_path / "data.csv", format="chatml")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"has no records"):
        read_conversations(tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match=r"not a `datasets` save_to_disk directory"):
        read_conversations(tmp_path)
    with pytest.raises(UserError, match=r"reasoning-gym has no task 'nope'; choose one of: ab, .*chain_sum"):
        read_conversations("reasoning-gym:nope")
    with pytest.raises(UserError, match=r"size=x must be a whole number"):
        read_conversations("reasoning-gym:chain_sum?size=x")
    with pytest.raises(UserError, match=r"refused the options \{'bogus': 3\}"):
        read_conversations("reasoning-gym:chain_sum?size=2&bogus=3")
    # Any other key is a field of the task's config: its difficulty.
    easy = read_conversations("reasoning-gym:chain_sum?size=3&seed=0&min_terms=2&max_terms=2&max_digits=1")
    assert all(len(c.messages[0]["content"].split(":")[-1].split()) == 4 for c in easy)   # "a + b ="
    with pytest.raises(UserError, match=r"built-in corpus with its own format"):
        read_conversations("chatterbot", format="alpaca")


# ---------------------------------------------------------------- built-in corpora

def test_truncated_json_list_parser_recovers_every_complete_record(tmp_path):
    records = [{"id": i, "text": "x" * i + " \"quoted\" ]},", "n": [i, i * 10]} for i in range(12)]
    whole = json.dumps(records, indent=2)
    cut = whole[:whole.index('"id": 9') + 4]  # stops inside record 9
    file = tmp_path / "cut.json"
    cases = [(cut, records[:9], True), (whole, records, False), ("[1, 23,\n 456]", [1, 23, 456], False),
             ('[{"a": 1},', [{"a": 1}], True), ('[{"a": 1}', [{"a": 1}], True)]
    for text, expected, truncated in cases:
        file.write_text(text, encoding="utf-8")
        for chunk in (1, 2, 7, 1 << 20):  # tiny chunks put records and numbers across chunk boundaries
            stats = {}
            assert list(iter_json_list(file, stats, chunk_chars=chunk)) == expected, (text[:20], chunk)
            assert stats["records"] == len(expected) and stats["truncated"] is truncated
    file.write_text(cut)
    stats = {}
    list(iter_json_list(file, stats))
    assert stats["tail_chars"] == len(cut) - cut.rindex("{")  # from the cut record's start


def test_real_sharegpt_file_is_recovered_up_to_its_cut(capsys):
    conversations, stats = load_sharegpt()
    assert stats["records"] > 17000 and stats["truncated"] is True and stats["tail_chars"] > 0
    assert stats["kept"] == len(conversations) > 17000
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["records"]
    assert all(check_messages(c.messages) is None for c in conversations)
    assert conversations[0].messages[0]["content"].startswith("Summarize the main ideas of Jeff Walker")
    assert conversations[0].source == "sharegpt[0]" and conversations[0].meta == {"id": "QWJhYvA_0"}
    assert len(read_conversations("sharegpt", limit=3)) == 3
    assert "sharegpt: recovered 3 records" in capsys.readouterr().err


def test_chatterbot_english_chats():
    conversations = read_conversations("chatterbot")
    assert len(conversations) == load_chatterbot()[1]["kept"] > 2000
    assert conversations[0].messages == [user("What is AI?"), assistant(
        "Artificial Intelligence is the branch of engineering and science devoted to constructing machines "
        "that think.")]
    for conv in conversations:
        assert check_messages(conv.messages) is None and conv.messages[-1]["role"] == "assistant"
    assert any(len(c.messages) > 2 for c in conversations)


@pytest.mark.parametrize("task", ["countdown", "basic_arithmetic", "gsm_symbolic", "chain_sum", "leg_counting"])
def test_reasoning_gym_tasks_are_seeded_and_scored_by_their_own_scorer(task):
    convs = reasoning_gym_conversations(task, size=4, seed=7, system="Answer with the bare answer.")
    again = reasoning_gym_conversations(task, size=4, seed=7, system="Answer with the bare answer.")
    assert [c.messages for c in convs] == [c.messages for c in again]
    assert [c.messages for c in reasoning_gym_conversations(task, size=4, seed=8)] != [c.messages[1:] for c in convs]
    for conv in convs:
        sys_turn, question, answer = conv.messages
        assert sys_turn == system("Answer with the bare answer.") and question["role"] == "user"
        meta = json.loads(json.dumps(conv.meta))  # plain JSON, and it still scores
        assert meta["task"] == task and meta["entry"]["question"] == question["content"]
        assert score_answer(meta, answer["content"]) == 1.0
        assert score_answer(meta, f"  <answer>{answer['content']}</answer>\n") == 1.0
        assert score_answer(meta, "12345678 wrong") < 1.0
        assert score_answer(meta, "") < 1.0


def test_reasoning_gym_is_the_same_in_every_process():
    import subprocess
    import sys

    # Some reasoning-gym tasks iterate sets, which PYTHONHASHSEED reorders; these five must not.
    code = ("import json; from lmforge.data.chat_corpora import reasoning_gym_conversations as make; "
            "print(json.dumps({t: [[c.messages, c.meta] for c in make(t, 3, 5)] for t in "
            "('countdown', 'basic_arithmetic', 'gsm_symbolic', 'chain_sum', 'leg_counting')}))")
    outputs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert outputs[0] == outputs[1] and len(json.loads(outputs[0])) == 5


def test_reasoning_gym_by_name_and_tasks_without_a_reference_answer():
    by_name = read_conversations("reasoning-gym:chain_sum?size=3&seed=2")
    assert [c.messages for c in by_name] == [c.messages for c in reasoning_gym_conversations("chain_sum", 3, 2)]
    assert by_name[0].source == "reasoning-gym:chain_sum?seed=2[0]"
    assert len(read_conversations("reasoning-gym:leg_counting", limit=5)) == 5  # default size 1000, cut to 5
    with pytest.raises(UserError, match=r"'boxnet' has no reference answer"):
        reasoning_gym_conversations("boxnet", 2, 0)
